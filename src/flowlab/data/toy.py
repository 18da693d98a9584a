"""The eight 2-D toy densities of the FFJORD experiments, with exact log-densities and entropies.

Every density samples, in distribution, exactly as FFJORD's reference generators
(``lib/toy_data.py``, ``inf_train_gen``) do in the limit of a large batch: the reference draws
some classes in fixed proportions or on ``linspace`` grids, which become independent draws with
the same proportions and uniform laws here.

``log_prob`` is the true log-density in nats with respect to Lebesgue measure on R^2, computed
in float64 from a closed form (8gaussians, checkerboard, rings, circles), a 1-D Gauss-Legendre
quadrature over a curve parameter (moons, swissroll, 2spirals) or an exact sum over the
preimages of a change of variables (pinwheel). ``entropy`` is the true differential entropy in
nats, stored: a converged grid integral of ``-p log p`` with that exact density, checked by a
Monte Carlo estimate (the comment next to each value gives both, with standard error and n).

Points are rows: ``sample`` returns ``(n, 2)`` and ``log_prob`` maps ``(n, 2) -> (n,)``.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flowlab.errors import ConfigError, DataError

_LOG_2PI = math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
# A linear-space quadrature sum below this is recomputed in log space: any term that underflowed
# to 0 (< 1e-308) is then negligible next to the sum, and only points far from the mass pay.
_LINEAR_FLOOR = 1e-280
# Elements per (points x nodes) intermediate; a handful of these float64 arrays stay < 1 GB.
_ELEMENTS_PER_CHUNK = 1 << 21


class ToyDensity(ABC):
    """A 2-D density that can be sampled and whose exact log-density and entropy are known.

    Attributes:
        name: the dataset's name (a key of :data:`DATASETS`).
        dim: 2.
        entropy: the true differential entropy in nats.
        bounds: half-width of a square window ``[-bounds, bounds]^2`` that holds all but a
            negligible part (< 1e-3) of the mass; used for plots and grid integrals.
    """

    dim: int = 2
    #: rows of ``x`` handed to ``_log_prob`` at once (subclasses with big intermediates lower it).
    chunk_size: int = 1 << 16

    def __init__(self, name: str, entropy: float, bounds: float = 4.0) -> None:
        self.name = name
        self.entropy = float(entropy)
        self.bounds = float(bounds)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, entropy={self.entropy:.4f} nats)"

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Draw ``n`` independent points, ``(n, 2)``.

        The draw is made in float64 on the generator's device (CPU without a generator), so a
        generator in the same state gives the same points whatever ``dtype`` is asked for; the
        result is then cast to ``dtype`` and moved to ``device`` (default: where it was drawn).
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ConfigError(f"sample size must be an int >= 0, got {n!r}")
        draw_device = generator.device if generator is not None else torch.device("cpu")
        x = self._sample(int(n), generator, draw_device)
        return x.to(device=device if device is not None else draw_device, dtype=dtype)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density in nats, ``(n, 2) -> (n,)``, in ``x``'s dtype and on its device.

        Computed in float64 and in chunks of rows, so memory stays bounded for any ``n``.
        Non-finite points get ``-inf``. No gradient is recorded: this is a reference value.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(
                f"{self.name}: log_prob expects points of shape (n, {self.dim}), got "
                f"{tuple(x.shape)}; stack the points as rows"
            )
        if not x.is_floating_point():
            raise DataError(f"{self.name}: log_prob expects floating points, got {x.dtype}")
        if torch.isnan(x).any():
            raise DataError(f"{self.name}: log_prob got NaN coordinates; drop or fix those rows")
        x64 = x.to(torch.float64)
        finite = torch.isfinite(x64).all(dim=1)
        out = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        rows = finite.nonzero().squeeze(1)
        for start in range(0, rows.numel(), self.chunk_size):
            idx = rows[start : start + self.chunk_size]
            out[idx] = self._log_prob(x64[idx])
        return out.to(x.dtype)

    @abstractmethod
    def _sample(
        self, n: int, generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """``n`` points ``(n, 2)`` in float64 on ``device``."""

    @abstractmethod
    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of finite float64 points, ``(m, 2) -> (m,)``."""


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``(n,)`` draws from U[0, 1) in float64."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=device)


def _normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device):
    """Standard normal draws of ``shape`` in float64."""
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=device)


def _choice(k: int, n: int, generator: torch.Generator | None, device: torch.device):
    """``(n,)`` class labels, uniform on ``0..k-1``."""
    return torch.randint(0, k, (n,), generator=generator, device=device)


def _unit_circle(angle: torch.Tensor) -> torch.Tensor:
    """``(m,) -> (m, 2)``: the points ``(cos angle, sin angle)``."""
    return torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


# --- closed forms --------------------------------------------------------------------------


class GaussianMixture(ToyDensity):
    """Equal-weight mixture of isotropic Gaussians with a common standard deviation ``std``."""

    def __init__(self, name: str, entropy: float, centres: torch.Tensor, std: float) -> None:
        super().__init__(name, entropy)
        self.centres = centres.to(torch.float64)  # (k, 2)
        self.std = float(std)

    def _sample(self, n, generator, device):
        label = _choice(self.centres.shape[0], n, generator, device)
        return self.centres.to(device)[label] + self.std * _normal((n, 2), generator, device)

    def _log_prob(self, x):
        centres = self.centres.to(x.device)
        sq_dist = (x[:, None, :] - centres[None]).pow(2).sum(dim=2)  # (m, k)
        log_norm = math.log(centres.shape[0]) + _LOG_2PI + 2.0 * math.log(self.std)
        return torch.logsumexp(-0.5 * sq_dist / self.std**2, dim=1) - log_norm


class Checkerboard(ToyDensity):
    """Uniform on the 8 cells ``(i, j)`` with ``i + j`` even of the 4x4 grid of 2x2 squares
    covering ``[-4, 4]^2``; density 1/32 there."""

    def _sample(self, n, generator, device):
        x1 = 4.0 * _uniform(n, generator, device) - 2.0
        x2 = (
            _uniform(n, generator, device)
            - 2.0 * _choice(2, n, generator, device).to(torch.float64)
            + torch.remainder(torch.floor(x1), 2.0)
        )
        return 2.0 * torch.stack([x1, x2], dim=1)

    def _log_prob(self, x):
        cell = torch.floor(x / 2.0)  # unit cells of the unscaled board
        inside = ((cell >= -2) & (cell <= 1)).all(dim=1)
        even = torch.remainder(cell.sum(dim=1), 2.0) == 0
        support = torch.full_like(x[:, 0], -math.log(32.0))
        return torch.where(inside & even, support, torch.full_like(support, -math.inf))


class RingMixture(ToyDensity):
    """Equal-weight mixture of circles of the given radii, uniform in angle, plus isotropic
    Gaussian noise of standard deviation ``std``.

    One ring of radius R has density ``exp(-(rho^2 + R^2) / (2 s^2)) I0(rho R / s^2) /
    (2 pi s^2)`` at radius ``rho``; with the scaled Bessel ``i0e(z) = exp(-z) I0(z)`` its log is
    ``-(rho - R)^2 / (2 s^2) + log i0e(rho R / s^2) - log(2 pi s^2)``, which never overflows.
    """

    def __init__(self, name: str, entropy: float, radii: tuple[float, ...], std: float) -> None:
        super().__init__(name, entropy)
        self.radii = torch.tensor(radii, dtype=torch.float64)  # (k,)
        self.std = float(std)

    def _sample(self, n, generator, device):
        radius = self.radii.to(device)[_choice(self.radii.numel(), n, generator, device)]
        angle = 2.0 * math.pi * _uniform(n, generator, device)
        noise = self.std * _normal((n, 2), generator, device)
        return radius[:, None] * _unit_circle(angle) + noise

    def _log_prob(self, x):
        rho = torch.linalg.vector_norm(x, dim=1)[:, None]  # (m, 1)
        radii = self.radii.to(x.device)[None]  # (1, k)
        var = self.std**2
        per_ring = -0.5 * (rho - radii).pow(2) / var + torch.log(
            torch.special.i0e(rho * radii / var)
        )
        log_norm = math.log(radii.numel()) + _LOG_2PI + math.log(var)
        return torch.logsumexp(per_ring, dim=1) - log_norm


# --- a point on a curve plus per-coordinate noise: 1-D quadrature --------------------------


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(d))`` for ``d <= 0``, accurate on the whole range."""
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


@dataclass(frozen=True)
class GaussianNoise:
    """Per-coordinate noise ``N(0, std^2)``."""

    std: float

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Noise of ``shape`` in float64."""
        return self.std * _normal(shape, generator, device)

    def density(self, y: torch.Tensor) -> torch.Tensor:
        """Density at each element of ``y`` (may underflow to 0 far away)."""
        return torch.exp(self.log_density(y))

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """Log-density at each element of ``y``."""
        return -0.5 * (y / self.std).pow(2) - math.log(self.std) - 0.5 * _LOG_2PI


@dataclass(frozen=True)
class BoxGaussianNoise:
    """Per-coordinate noise ``U[low, high] + N(0, std^2)``: the density at ``y`` is
    ``(Phi((y - low)/std) - Phi((y - high)/std)) / (high - low)``.

    The difference ``Phi(a) - Phi(b)`` (``a > b``) is evaluated as ``Phi(-b) - Phi(-a)`` when
    ``a + b > 0``, so that both terms lie in the lower tail where they carry full relative
    precision and the subtraction never cancels.
    """

    low: float
    high: float
    std: float

    def sample(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
    ) -> torch.Tensor:
        """Noise of ``shape`` in float64."""
        box = self.low + (self.high - self.low) * torch.rand(
            shape, generator=generator, dtype=torch.float64, device=device
        )
        return box + self.std * _normal(shape, generator, device)

    def _lower_tail_t(self, y: torch.Tensor) -> torch.Tensor:
        """``t = a / sqrt(2)`` of the lower-tail pair ``(a, b = a - (high - low) / std)``.

        ``a = (y - low) / std`` unless ``a + b > 0``, where the pair becomes ``(-b, -a)``; in
        units of ``sqrt(2) std`` that is ``t = min(t_a, d - t_a)`` with ``d`` the box width.
        """
        scale = _SQRT_HALF / self.std
        t = (y - self.low).mul_(scale)
        return torch.minimum(t, (self.high - self.low) * scale - t)

    def density(self, y: torch.Tensor) -> torch.Tensor:
        """Density at each element of ``y`` via ``erfc`` (fast; may underflow to 0 far away)."""
        d = (self.high - self.low) * _SQRT_HALF / self.std
        t = self._lower_tail_t(y)
        out = torch.erfc(-t)  # 2 Phi(a)
        out -= torch.erfc(t.neg_().add_(d))  # 2 Phi(b)
        return out.mul_(0.5 / (self.high - self.low))

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """Log-density at each element of ``y`` via ``log_ndtr`` (finite everywhere)."""
        a = math.sqrt(2.0) * self._lower_tail_t(y)
        log_a = torch.special.log_ndtr(a)
        log_b = torch.special.log_ndtr(a - (self.high - self.low) / self.std)
        return log_a + _log1mexp(log_b - log_a) - math.log(self.high - self.low)


Noise = GaussianNoise | BoxGaussianNoise


@dataclass(frozen=True)
class CurveBranch:
    """One branch of a noisy-curve density: ``x = curve(s) + noise`` with ``s`` on
    ``[low, high]`` drawn by ``icdf(U)``, ``U ~ U[0, 1)``, whose density is ``exp(log_pdf(s))``.

    ``curve`` maps ``(m,)`` parameters to ``(m, 2)`` points; ``noise`` acts on each coordinate
    independently.
    """

    curve: Callable[[torch.Tensor], torch.Tensor]
    low: float
    high: float
    icdf: Callable[[torch.Tensor], torch.Tensor]
    log_pdf: Callable[[torch.Tensor], torch.Tensor]
    noise: Noise


def uniform_branch(
    curve: Callable[[torch.Tensor], torch.Tensor], low: float, high: float, noise: Noise
) -> CurveBranch:
    """A :class:`CurveBranch` whose parameter is uniform on ``[low, high]``."""
    return CurveBranch(
        curve=curve,
        low=low,
        high=high,
        icdf=lambda u: low + (high - low) * u,
        log_pdf=lambda s: torch.full_like(s, -math.log(high - low)),
        noise=noise,
    )


def _arclength_panels(branch: CurveBranch, panel_length: float) -> np.ndarray:
    """Edges ``(p + 1,)`` of parameter panels that cut the curve into pieces of about equal
    arc length, at most ``panel_length`` each (from a 16,384-chord polyline)."""
    s = torch.linspace(branch.low, branch.high, 16385, dtype=torch.float64)
    chords = torch.linalg.vector_norm(torch.diff(branch.curve(s), dim=0), dim=1)
    arc = np.concatenate([[0.0], np.cumsum(chords.numpy())])
    panels = max(1, math.ceil(arc[-1] / panel_length))
    return np.interp(np.linspace(0.0, arc[-1], panels + 1), arc, s.numpy())


class NoisyCurves(ToyDensity):
    """Equal-weight mixture of :class:`CurveBranch` es (moons, swissroll, 2spirals).

    The density ``p(x) = mean_b int p_b(s) prod_j k_b(x_j - c_bj(s)) ds`` is integrated by
    composite Gauss-Legendre quadrature of ``order`` nodes on panels of arc length at most
    ``panel_length`` (a fraction of the noise scale, so every bump of the integrand spans
    several nodes). The sum runs in linear space; points where it is below ``1e-280`` (far from
    all mass) are recomputed in log space with a logsumexp over nodes.

    Accuracy (against 8x finer panels and scipy ``quad``): a few 1e-9 nats or better where
    ``log p > -20``; far from the mass the integrand narrows and the error grows, for 2spirals
    to ~1e-5 nats at ``log p = -50`` and ~1e-2 nats at ``log p = -300`` (moons and
    swissroll: < 2e-5 nats down to ``log p = -300``).
    """

    def __init__(
        self,
        name: str,
        entropy: float,
        branches: tuple[CurveBranch, ...],
        panel_length: float,
        order: int = 8,
    ) -> None:
        super().__init__(name, entropy)
        self.branches = branches
        self.panel_length = float(panel_length)
        self.order = int(order)
        gl_x, gl_w = np.polynomial.legendre.leggauss(self.order)
        # per branch: curve points at the nodes (q, 2) and log quadrature weights (q,) that
        # include the parameter density and the branch weight
        self._nodes: list[tuple[torch.Tensor, torch.Tensor]] = []
        for branch in branches:
            edges = _arclength_panels(branch, self.panel_length)
            half = np.diff(edges)[:, None] / 2.0
            s = torch.from_numpy(((edges[:-1, None] + edges[1:, None]) / 2.0 + half * gl_x).ravel())
            log_w = torch.from_numpy(np.log((half * gl_w).ravel()))
            log_w = log_w + branch.log_pdf(s) - math.log(len(branches))
            self._nodes.append((branch.curve(s), log_w))
        total_nodes = sum(c.shape[0] for c, _ in self._nodes)
        self.chunk_size = max(1, _ELEMENTS_PER_CHUNK // total_nodes)

    @property
    def num_nodes(self) -> int:
        """Quadrature nodes over all branches."""
        return sum(c.shape[0] for c, _ in self._nodes)

    def refined(self, factor: float) -> NoisyCurves:
        """The same density with panels ``factor`` times shorter (to check convergence)."""
        return NoisyCurves(
            self.name, self.entropy, self.branches, self.panel_length / factor, self.order
        )

    def _sample(self, n, generator, device):
        label = _choice(len(self.branches), n, generator, device)
        u = _uniform(n, generator, device)
        out = torch.empty(n, 2, dtype=torch.float64, device=device)
        for b, branch in enumerate(self.branches):
            mask = label == b
            m = int(mask.sum())
            out[mask] = branch.curve(branch.icdf(u[mask])) + branch.noise.sample(
                (m, 2), generator, device
            )
        return out

    def _log_prob(self, x):
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for branch, (centres, log_w) in zip(self.branches, self._nodes, strict=True):
            centres = centres.to(x.device)
            kern = [branch.noise.density(x[:, j, None] - centres[None, :, j]) for j in (0, 1)]
            total += (kern[0] * kern[1]) @ log_w.to(x.device).exp()  # (m, q) @ (q,)
        out = torch.log(total)
        far = total < _LINEAR_FLOOR
        if far.any():
            out[far] = self._log_prob_log_space(x[far])
        return out

    def _log_prob_log_space(self, x: torch.Tensor) -> torch.Tensor:
        """The same sum as ``_log_prob`` with every term kept as a logarithm."""
        terms = []
        for branch, (centres, log_w) in zip(self.branches, self._nodes, strict=True):
            log_kern = branch.noise.log_density(x[:, None, :] - centres.to(x.device)[None])
            terms.append(log_kern.sum(dim=2) + log_w.to(x.device))
        return torch.logsumexp(torch.cat(terms, dim=1), dim=1)


# --- pinwheel: exact change of variables ---------------------------------------------------


class Pinwheel(ToyDensity):
    """FFJORD's pinwheel: ``x = 2 R(-a) f`` with ``f = (r, t)``, ``r ~ N(1, 0.3^2)``,
    ``t ~ N(0, 0.1^2)``, class ``k`` uniform on 0..4, ``a = 2 pi k / 5 + 0.25 exp(r)`` and
    ``R(a)`` the counter-clockwise rotation (the reference's ``einsum("ti,tij->tj", f, R)``).

    Exact density: with ``y = x / 2 = rho (cos theta, sin theta)`` and ``f = rho (cos phi,
    sin phi)`` (the rotation keeps ``rho``), a class-``k`` preimage solves
    ``h(phi) = theta + 2 pi k / 5 (mod 2 pi)`` with ``h(phi) = phi - 0.25 exp(rho cos phi)``.
    In polar coordinates the map ``(rho, phi) -> (rho, theta)`` has Jacobian ``h'(phi) =
    1 + 0.25 rho sin(phi) exp(rho cos phi)``, and the factor ``rho`` of both polar area
    elements cancels, so ``p_y(y) = sum_k 1/5 sum_phi N2(f(phi)) / |h'(phi)|`` and
    ``p_x(x) = p_y(x / 2) / 4``. Since the five targets are ``theta + (2 pi / 5) Z``, the
    roots of all classes together are the crossings of ``u = 5 (h - theta) / (2 pi)`` through
    the integers, each weighted 1/5.

    The crossings are bracketed on a grid of ``grid_size`` intervals over ``[-pi, pi]``
    (finer for large ``rho``, so that ``u`` moves less than 1/2 per interval) and refined by
    safeguarded Newton steps to machine precision. Where ``h`` has a fold (``h' = 0``, only
    where ``N2`` is below ``1e-7`` of its peak), two roots closer than one grid interval can be
    missed; that region carries negligible mass. Beyond ``|x| ~ 14`` the grid is capped and
    the value is a lower bound of a density below ``exp(-200)``.
    """

    radial_mean = 1.0
    radial_std = 0.3
    tangential_std = 0.1
    classes = 5
    rate = 0.25
    scale = 2.0

    def __init__(self, name: str, entropy: float, grid_size: int = 2048) -> None:
        super().__init__(name, entropy)
        self.grid_size = int(grid_size)
        self.max_grid_size = max(self.grid_size, 1 << 15)

    def refined(self, factor: int) -> Pinwheel:
        """The same density bracketing roots on a ``factor`` times finer grid."""
        return Pinwheel(self.name, self.entropy, self.grid_size * factor)

    def _sample(self, n, generator, device):
        label = _choice(self.classes, n, generator, device).to(torch.float64)
        f = _normal((n, 2), generator, device) * torch.tensor(
            [self.radial_std, self.tangential_std], dtype=torch.float64, device=device
        )
        f[:, 0] += self.radial_mean
        angle = 2.0 * math.pi * label / self.classes + self.rate * torch.exp(f[:, 0])
        cos, sin = torch.cos(angle), torch.sin(angle)
        y = torch.stack([f[:, 0] * cos + f[:, 1] * sin, -f[:, 0] * sin + f[:, 1] * cos], dim=1)
        return self.scale * y

    def _grid_sizes(self, rho: torch.Tensor) -> torch.Tensor:
        """Per point ``(m,)``, a power-of-two number of grid intervals on which ``u`` moves by
        less than 1/2 per interval (capped at ``max_grid_size``)."""
        max_slope = 1.0 + self.rate * rho * torch.exp(rho)  # bound on |h'|
        needed = 2.0 * self.classes * max_slope  # intervals so that |du| < 1/2 on each
        size = torch.clamp(needed, min=self.grid_size, max=self.max_grid_size)
        return torch.exp2(torch.ceil(torch.log2(size))).to(torch.int64)

    def _log_prob(self, x):
        y = x / self.scale
        rho = torch.linalg.vector_norm(y, dim=1)
        theta = torch.atan2(y[:, 1], y[:, 0])
        out = torch.empty_like(rho)
        sizes = self._grid_sizes(rho)
        for size in torch.unique(sizes).tolist():
            group = (sizes == size).nonzero().squeeze(1)
            per_chunk = max(1, _ELEMENTS_PER_CHUNK // size)
            for start in range(0, group.numel(), per_chunk):
                idx = group[start : start + per_chunk]
                out[idx] = self._log_prob_polar(rho[idx], theta[idx], size)
        return out - 2.0 * math.log(self.scale)

    def _h(self, phi: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h(phi)`` and ``h'(phi)`` for matching shapes of ``phi`` and ``rho``."""
        e = self.rate * torch.exp(rho * torch.cos(phi))
        return phi - e, 1.0 + e * rho * torch.sin(phi)

    def _log_prob_polar(self, rho: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
        """``log p_y`` at ``y = rho (cos theta, sin theta)``; ``(m,), (m,) -> (m,)``."""
        m = rho.shape[0]
        phi = torch.linspace(-math.pi, math.pi, size + 1, dtype=torch.float64, device=rho.device)
        h, _ = self._h(phi[None, :], rho[:, None])  # (m, size + 1)
        level = torch.floor((h - theta[:, None]) * (self.classes / (2.0 * math.pi)))
        point, interval = (level[:, 1:] != level[:, :-1]).nonzero(as_tuple=True)
        crossed = torch.maximum(level[point, interval], level[point, interval + 1])
        target = theta[point] + (2.0 * math.pi / self.classes) * crossed
        r = rho[point]
        lo, hi = phi[interval], phi[interval + 1]
        g_lo = self._h(lo, r)[0] - target
        g_hi = self._h(hi, r)[0] - target
        root = lo - g_lo * (hi - lo) / (g_hi - g_lo)  # regula falsi start inside the bracket
        best, best_g = root, torch.full_like(root, math.inf)
        for _ in range(8):  # safeguarded Newton: keep the bracket, bisect if Newton leaves it
            g, dg = self._h(root, r)
            g = g - target
            better = g.abs() < best_g
            best, best_g = torch.where(better, root, best), torch.where(better, g.abs(), best_g)
            same = torch.sign(g) == torch.sign(g_lo)
            lo, g_lo = torch.where(same, root, lo), torch.where(same, g, g_lo)
            hi = torch.where(same, hi, root)
            newton = root - g / dg
            inside = (newton >= lo) & (newton <= hi)
            root = torch.where(inside, newton, 0.5 * (lo + hi))
        # the best iterate: once converged, rounding noise in g can send Newton astray
        root = best
        _, dh = self._h(root, r)
        f0, f1 = r * torch.cos(root), r * torch.sin(root)
        log_n2 = (
            -0.5 * ((f0 - self.radial_mean) / self.radial_std).pow(2)
            - 0.5 * (f1 / self.tangential_std).pow(2)
            - _LOG_2PI
            - math.log(self.radial_std * self.tangential_std)
        )
        term = log_n2 - torch.log(dh.abs()) - math.log(self.classes)
        peak = torch.full((m,), -math.inf, dtype=term.dtype, device=term.device)
        peak = peak.scatter_reduce(0, point, term, reduce="amax", include_self=True)
        safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        summed = torch.zeros_like(peak).index_add_(0, point, torch.exp(term - safe_peak[point]))
        return torch.log(summed) + safe_peak


# --- the registry --------------------------------------------------------------------------


def _gaussian_centres() -> torch.Tensor:
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
    return 4.0 * _unit_circle(angle) / 1.414


def _moon_branches() -> tuple[CurveBranch, ...]:
    # sklearn.datasets.make_moons(noise=0.1), then * 2 + (-1, -0.2) as in FFJORD
    noise = GaussianNoise(0.2)

    def outer(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([2.0 * torch.cos(s) - 1.0, 2.0 * torch.sin(s) - 0.2], dim=1)

    def inner(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([1.0 - 2.0 * torch.cos(s), 0.8 - 2.0 * torch.sin(s)], dim=1)

    return (uniform_branch(outer, 0.0, math.pi, noise), uniform_branch(inner, 0.0, math.pi, noise))


def _swissroll_branches() -> tuple[CurveBranch, ...]:
    # sklearn.datasets.make_swiss_roll(noise=1.0), coordinates (0, 2), divided by 5
    def roll(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5.0

    return (uniform_branch(roll, 1.5 * math.pi, 4.5 * math.pi, GaussianNoise(0.2)),)


def _spiral_branches() -> tuple[CurveBranch, ...]:
    # n = 3 pi sqrt(U) has density 2 n / (3 pi)^2; d = c(n) + 0.5 U'; the reference returns
    # d or -d, divides by 3 and adds N(0, 0.1^2), so the box noise is [0, 1/6] or [-1/6, 0].
    end = 3.0 * math.pi

    def spiral(sign: float) -> Callable[[torch.Tensor], torch.Tensor]:
        def curve(n: torch.Tensor) -> torch.Tensor:
            return sign * torch.stack([-n * torch.cos(n), n * torch.sin(n)], dim=1) / 3.0

        return curve

    def branch(sign: float, low: float, high: float) -> CurveBranch:
        return CurveBranch(
            curve=spiral(sign),
            low=0.0,
            high=end,
            icdf=lambda u: end * torch.sqrt(u),
            log_pdf=lambda n: torch.log(2.0 * n) - 2.0 * math.log(end),
            noise=BoxGaussianNoise(low, high, 0.1),
        )

    return (branch(1.0, 0.0, 1.0 / 6.0), branch(-1.0, -1.0 / 6.0, 0.0))


# Entropies in nats, -int p log p. Stored: a midpoint-rule grid integral of -p log p with the
# exact log_prob (cell side h over [-L, L]^2; halving h changes it by < 1e-6 and the grid mass
# is 1 to 1e-8), rounded to 4 decimals. "MC" is the independent check -mean log_prob of n fresh
# samples, +- its standard error; every grid value lies within 2.5 s.e. of it.
DATASETS: dict[str, ToyDensity] = {
    d.name: d
    for d in (
        # grid 2.8318804 (L=6, h=0.025); MC 2.83191 +- 0.00031, n=1e7
        GaussianMixture("8gaussians", 2.8319, _gaussian_centres(), 0.5 / 1.414),
        # exact: uniform on 8 cells of area 4 (MC with n=1e6 gives log 32 exactly)
        Checkerboard("checkerboard", math.log(32.0)),
        # grid 2.6454503 (L=5, h=0.035); MC 2.64624 +- 0.00050, n=2e6
        NoisyCurves("2spirals", 2.6455, _spiral_branches(), panel_length=0.2),
        # grid 2.3177881 (L=6, h=0.03); MC 2.31950 +- 0.00069 and 2.31710 +- 0.00069, n=2e6 each
        Pinwheel("pinwheel", 2.3178),
        # grid 2.6231828 (L=5, h=0.01); MC 2.62340 +- 0.00028, n=1e7
        RingMixture("rings", 2.6232, (3.0, 2.25, 1.5, 0.75), 0.08),
        # grid 3.2681357 (L=5, h=0.025); MC 3.26811 +- 0.00024, n=1e7
        RingMixture("circles", 3.2681, (3.0, 1.5), 0.24),
        # grid 2.3938792 (L=5, h=0.025); MC 2.39402 +- 0.00037, n=4e6
        NoisyCurves("moons", 2.3939, _moon_branches(), panel_length=0.2),
        # grid 2.6696462 (L=5, h=0.025); MC 2.66930 +- 0.00038, n=4e6
        NoisyCurves("swissroll", 2.6696, _swissroll_branches(), panel_length=0.2),
    )
}


def get_dataset(name: str) -> ToyDensity:
    """The toy density called ``name`` (one of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise DataError(f"unknown toy dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]
