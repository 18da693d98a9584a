"""Planar and radial layers (Rezende & Mohamed, "Variational Inference with Normalizing Flows",
2015).

Both were defined as maps from noise to data, ``g(z) = z + ...``, with a cheap log-determinant.
In flowlab ``forward`` goes data -> noise (see :mod:`flowlab.transforms.base`), so here the
paper's ``g`` is :meth:`inverse`, and :meth:`forward` is the inverse of ``g``:

* planar: ``g(z) = z + u_hat tanh(w.z + b)``. It has no closed-form inverse, but the whole
  problem reduces to one scalar equation along ``w`` (solved per row by a safeguarded
  Newton/bisection iteration in float64), after which ``z`` follows in closed form.
* radial: ``g(z) = z + beta (z - z0) / (alpha + |z - z0|)``. The radius of ``z`` solves a
  quadratic, so the inverse is closed form.

Both layers work on vectors: inputs of shape ``(batch, dim)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from flowlab.errors import ConfigError, DataError
from flowlab.transforms.base import Pair, Transform, check_context, randomize_, register_example

# Newton/bisection for the planar inverse: the bracket has width 2|w.u_hat|, so even pure
# bisection reaches double precision well within this many steps.
_MAX_ITER = 200
_RTOL = 1e-13


def _check_dim(name: str, dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"{name}: dim must be a positive integer, got {dim!r}")
    return dim


def _check_vectors(name: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{name} works on vectors of shape (batch, {dim}), got {got}")


def _sech2(a: torch.Tensor) -> torch.Tensor:
    """``1 - tanh(a)^2``, without the cancellation that formula has for large ``|a|``."""
    e = torch.exp(-2.0 * a.abs())
    return 4.0 * e / (1.0 + e) ** 2


def _softplus_minus_one(s: torch.Tensor) -> torch.Tensor:
    """``m(s) = -1 + softplus(s)``: the smooth map onto ``(-1, inf)`` that sets ``w.u_hat``."""
    return F.softplus(s) - 1.0


def solve_planar_root(c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The root ``a`` of ``a + m tanh(a) = c``, elementwise, for a scalar ``m >= -1``.

    The left side is strictly increasing in ``a`` for ``m >= -1`` (its derivative
    ``1 + m sech^2(a)`` is positive except at ``a = 0`` when ``m = -1``), and since
    ``|tanh| < 1`` the root lies in ``[c - |m|, c + |m|]``. Newton steps are taken while they
    stay inside the shrinking bracket and at least halve the step of two iterations ago
    (the safeguard of Numerical Recipes' ``rtsafe``); otherwise the bracket is bisected. Runs
    vectorized over ``c`` and returns a tensor of ``c``'s shape and dtype, without gradients
    (see :meth:`Planar.forward` for the differentiable version).
    """
    with torch.no_grad():
        c = c.detach()
        m = m.detach().to(c)
        spread = m.abs()
        lo, hi = c - spread, c + spread
        a = torch.minimum(torch.maximum(c - m * torch.tanh(c), lo), hi)
        step = hi - lo
        step_before = step
        finite = torch.isfinite(c)
        for _ in range(_MAX_ITER):
            f = a + m * torch.tanh(a) - c
            slope = 1.0 + m * _sech2(a)
            lo = torch.where(f < 0, a, lo)
            hi = torch.where(f > 0, a, hi)
            newton = f / torch.where(slope > 0, slope, torch.ones_like(slope))
            candidate = a - newton
            use_newton = (slope > 0) & (candidate >= lo) & (candidate <= hi) \
                & (2.0 * newton.abs() <= step_before.abs())
            new = torch.where(use_newton, candidate, 0.5 * (lo + hi))
            new = torch.where(f == 0, a, new)
            step_before, step = step, new - a
            a = new
            tol = _RTOL * (1.0 + a.abs())
            done = (step.abs() <= tol) | (hi - lo <= tol) | ~finite
            if bool(done.all()):
                break
        return a


class Planar(Transform):
    """A planar layer on vectors of shape ``(batch, dim)``.

    ``inverse`` (noise ``z`` -> data ``x``) is the paper's map ``x = z + u_hat tanh(w.z + b)``
    with ``log|det dx/dz| = log(1 + (w.u_hat) tanh'(w.z + b))``; ``forward`` (data -> noise)
    solves it numerically. ``u`` is reparameterized as
    ``u_hat = u + (m(w.u) - w.u) w / |w|^2`` with ``m(s) = -1 + softplus(s)``, so that
    ``w.u_hat = m(w.u) >= -1`` whatever the raw parameters: the map is then monotone along
    ``w`` and so invertible.

    Args:
        dim: the event size D.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = _check_dim("Planar", dim)
        w = torch.randn(dim) / math.sqrt(dim)
        # Start near the identity: u = log(e - 1) w / |w|^2 makes w.u = log(e - 1), where
        # m(w.u) = -1 + softplus(w.u) = 0, so u_hat = 0; a little noise breaks the symmetry.
        # (Random u of unit size made 16 stacked layers start at NLL ~29 nats on moons.)
        u = math.log(math.e - 1) * w / (w @ w) + 0.01 * torch.randn(dim)
        self.w = nn.Parameter(w)
        self.u = nn.Parameter(u)
        self.b = nn.Parameter(torch.zeros(()))

    def constrained(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_hat, w.u_hat)``: the reparameterized ``u`` (shape ``(dim,)``) and its
        projection on ``w`` (a scalar, ``>= -1``), in ``dtype`` (default: the parameters')."""
        w, u = self.w, self.u
        if dtype is not None:
            w, u = w.to(dtype), u.to(dtype)
        wu = w @ u
        m = _softplus_minus_one(wu)
        norm2 = w @ w
        safe = norm2.clamp_min(torch.finfo(norm2.dtype).tiny)
        u_hat = u + ((m - wu) / safe) * w
        # w.u_hat is m wherever |w|^2 is a normal number (norm2 / safe is then exactly 1);
        # at w = 0 the layer is a translation (u_hat = u) with w.u_hat = 0, and the blend
        # keeps the log-determinant consistent with that.
        ratio = norm2 / safe
        return u_hat, ratio * m + (1.0 - ratio) * wu

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` ``(batch, dim)`` -> data ``x``, with ``log|det dx/dy|`` ``(batch,)``."""
        _check_vectors("Planar", y, self.dim)
        check_context(context, y.shape[0], None, y)
        u_hat, m = self.constrained(y.dtype)
        pre = y @ self.w.to(y.dtype) + self.b.to(y.dtype)
        x = y + torch.tanh(pre)[:, None] * u_hat
        return x, torch.log1p(m * _sech2(pre))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` ``(batch, dim)`` -> noise ``y``, with ``log|det dy/dx|`` ``(batch,)``.

        With ``a = w.y + b`` the noise-side pre-activation, ``x = y + u_hat tanh(a)`` gives
        ``w.x + b = a + (w.u_hat) tanh(a)``: a scalar equation for ``a`` per row, solved in
        float64. Then ``y = x - u_hat tanh(a)``. Gradients with respect to ``x`` and the
        parameters are exact to first order: the solver's root is detached and one Newton
        step is taken from it with autograd, whose derivative at a root is the
        implicit-function-theorem derivative ``da = (dc - tanh(a) dm) / (1 + m sech^2(a))``.
        """
        _check_vectors("Planar", x, self.dim)
        check_context(context, x.shape[0], None, x)
        f64 = torch.float64
        u_hat, m = self.constrained(f64)
        x64 = x.to(f64)
        c = x64 @ self.w.to(f64) + self.b.to(f64)
        root = solve_planar_root(c, m)
        slope = 1.0 + m * _sech2(root)
        # slope is 0 only at the degenerate point m = -1, a = 0; keep the division finite
        slope = torch.where(slope > 0, slope, torch.ones_like(slope))
        a = root - (root + m * torch.tanh(root) - c) / slope
        y = x64 - torch.tanh(a)[:, None] * u_hat
        ladj = -torch.log1p(m * _sech2(a))
        return y.to(x.dtype), ladj.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Radial(Transform):
    """A radial layer on vectors of shape ``(batch, dim)``.

    ``inverse`` (noise ``z`` -> data ``x``) is the paper's map
    ``x = z + beta (z - z0) / (alpha + r)``, ``r = |z - z0|``, with ``alpha = softplus(.) > 0``
    and ``beta = -alpha + softplus(.) >= -alpha`` (the condition for invertibility);
    ``forward`` (data -> noise) inverts it in closed form. With ``h = 1 / (alpha + r)``,
    ``log|det dx/dz| = (dim - 1) log(1 + beta h) + log(1 + beta h + beta h' r)``, evaluated in
    the equivalent forms ``1 + beta h = (s + r) / (alpha + r)`` and
    ``1 + beta h + beta h' r = (r^2 + 2 alpha r + s alpha) / (alpha + r)^2`` where
    ``s = alpha + beta >= 0``: sums of non-negative terms, free of cancellation.

    Args:
        dim: the event size D.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = _check_dim("Radial", dim)
        self.z0 = nn.Parameter(torch.zeros(dim))
        # equal raw values make beta = 0: the layer starts as the identity
        self.raw_alpha = nn.Parameter(torch.zeros(()))
        self.raw_beta = nn.Parameter(torch.zeros(()))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, beta)`` as scalars, ``alpha > 0`` and ``beta >= -alpha``."""
        alpha = F.softplus(self.raw_alpha)
        return alpha, F.softplus(self.raw_beta) - alpha

    def _log_det_noise_to_data(self, r: torch.Tensor, alpha: torch.Tensor,
                               s: torch.Tensor) -> torch.Tensor:
        """``log|det dx/dz|`` at noise-side radius ``r`` (``s = alpha + beta``)."""
        log_ar = torch.log(alpha + r)
        radial = torch.log(r * (r + 2.0 * alpha) + s * alpha) - 2.0 * log_ar
        return (self.dim - 1) * (torch.log(s + r) - log_ar) + radial

    def _params(self, ref: torch.Tensor):
        alpha = F.softplus(self.raw_alpha.to(ref.dtype))
        s = F.softplus(self.raw_beta.to(ref.dtype))
        return self.z0.to(ref.dtype), alpha, s

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` ``(batch, dim)`` -> data ``x``, with ``log|det dx/dy|`` ``(batch,)``."""
        _check_vectors("Radial", y, self.dim)
        check_context(context, y.shape[0], None, y)
        z0, alpha, s = self._params(y)
        diff = y - z0
        r = torch.linalg.vector_norm(diff, dim=1)
        # x - z0 = (1 + beta / (alpha + r)) (y - z0) = (s + r) / (alpha + r) (y - z0)
        x = z0 + diff * ((s + r) / (alpha + r))[:, None]
        return x, self._log_det_noise_to_data(r, alpha, s)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` ``(batch, dim)`` -> noise ``y``, with ``log|det dy/dx|`` ``(batch,)``.

        The noise-side radius ``r`` is the positive root of
        ``r^2 + (s - r_x) r - alpha r_x = 0`` (``r_x = |x - z0|``, ``s = alpha + beta``),
        taken as ``(D - q) / 2`` when ``q = s - r_x <= 0`` and as ``2 alpha r_x / (q + D)``
        otherwise (``D`` the square root of the discriminant), so that no branch subtracts
        nearly equal numbers.
        """
        _check_vectors("Radial", x, self.dim)
        check_context(context, x.shape[0], None, x)
        z0, alpha, s = self._params(x)
        diff = x - z0
        r_x = torch.linalg.vector_norm(diff, dim=1)
        q = s - r_x
        disc = torch.sqrt(q * q + 4.0 * alpha * r_x)
        positive = q > 0
        # each branch's denominator is replaced by 1 where the branch is not taken, so that the
        # unused side of torch.where cannot send NaN into the gradients
        r = torch.where(positive,
                        2.0 * alpha * r_x / torch.where(positive, q + disc, torch.ones_like(q)),
                        0.5 * (disc - q))
        y = z0 + diff * ((alpha + r) / (s + r))[:, None]
        return y, -self._log_det_noise_to_data(r, alpha, s)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


# -- conformance examples -------------------------------------------------------------------------
def _planar_example(dim: int, seed: int) -> Planar:
    gen = torch.Generator().manual_seed(seed)
    layer = randomize_(Planar(dim), std=0.5, generator=gen)
    with torch.no_grad():
        # A contracting layer, but well away from the degenerate w.u_hat = -1: set w.u so
        # that m(w.u) = -0.5 (softplus(w.u) = 0.5), and a bias that moves the tanh off zero.
        w = layer.w
        target = math.log(math.expm1(0.5))
        layer.u.add_((target - w @ layer.u) / (w @ w) * w)
        layer.b.fill_(0.4)
    return layer


def _radial_example(dim: int, seed: int, raw_alpha: float, raw_beta: float) -> Radial:
    gen = torch.Generator().manual_seed(seed)
    layer = randomize_(Radial(dim), std=0.5, generator=gen)
    with torch.no_grad():
        layer.raw_alpha.fill_(raw_alpha)
        layer.raw_beta.fill_(raw_beta)
    return layer


@register_example("planar", (2,))
def _planar_2d() -> Transform:
    return _planar_example(2, seed=11)


@register_example("planar-3d", (3,))
def _planar_3d() -> Transform:
    return _planar_example(3, seed=12)


@register_example("radial", (2,))
def _radial_2d() -> Transform:
    # expanding: alpha = softplus(0.2) ~ 0.80, alpha + beta = softplus(1.5) ~ 1.70, beta ~ 0.90
    return _radial_example(2, seed=13, raw_alpha=0.2, raw_beta=1.5)


@register_example("radial-3d", (3,))
def _radial_3d() -> Transform:
    # contracting: alpha ~ 1.31, alpha + beta ~ 0.47 (away from the singular beta = -alpha)
    return _radial_example(3, seed=14, raw_alpha=1.0, raw_beta=-0.5)
