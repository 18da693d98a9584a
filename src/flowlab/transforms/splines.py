"""Rational-quadratic neural splines (Durkan et al. 2019, "Neural Spline Flows").

A monotone rational-quadratic spline maps ``[-bound, bound]`` onto itself through ``K`` bins;
outside it is the identity. The boundary derivatives are 1, so the spline joins the identity
tails with a continuous derivative. :func:`rational_quadratic_spline` is the elementwise map;
:class:`RQSCoupling` and :class:`RQSAutoregressive` get its parameters from an MLP of half of
the features and from a MADE respectively. ``forward`` maps data to noise, as everywhere.

Parameterisation of the raw (unconstrained) spline parameters, per element:

* bin widths ``w = min_width + (1 - K min_width) softmax(widths)`` (fractions of ``2 bound``),
  heights likewise; knots are their cumulative sums, with the first knot exactly ``-bound``
  and the last exactly ``+bound``;
* interior derivatives ``d = min_derivative + softplus(derivatives + c)``, with ``c`` chosen so
  that a raw 0 gives ``d = 1``: all-zero raw parameters give the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from flowlab.errors import ConfigError, DataError
from flowlab.nets.made import MADE
from flowlab.nets.mlp import MLP, with_context
from flowlab.transforms.autoregressive import check_vectors
from flowlab.transforms.base import (
    Pair,
    Transform,
    check_context,
    randomize_,
    register_example,
)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_spline_options(bound, min_width, min_height, min_derivative, bins: int) -> None:
    def positive(value, name):
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not 0 < value < math.inf:
            raise ConfigError(f"{name} must be a positive finite number, got {value!r}")

    positive(bound, "bound")
    positive(min_derivative, "min_derivative")
    for value, name in ((min_width, "min_width"), (min_height, "min_height")):
        positive(value, name)
        if value * bins >= 1:
            raise ConfigError(f"{name} * bins must be below 1 (the bins must fit in the "
                              f"interval), got {value} * {bins}")


def spline_knots(widths: torch.Tensor, heights: torch.Tensor, derivatives: torch.Tensor, *,
                 bound: float, min_width: float = 1e-3, min_height: float = 1e-3,
                 min_derivative: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots from raw parameters: ``(x_knots, y_knots, derivatives)``, each ``(..., K + 1)``.

    ``widths``, ``heights``: ``(..., K)``; ``derivatives``: ``(..., K - 1)`` (interior knots).
    The knots run from exactly ``-bound`` to exactly ``+bound``; the end derivatives are 1.
    """
    bins = widths.shape[-1]
    if bins < 1 or heights.shape[-1] != bins or derivatives.shape[-1] != bins - 1:
        raise DataError(f"spline parameters need K >= 1 widths, K heights and K - 1 "
                        f"derivatives in their last dimension, got {widths.shape[-1]}, "
                        f"{heights.shape[-1]} and {derivatives.shape[-1]}")
    _check_spline_options(bound, min_width, min_height, min_derivative, bins)

    def knots(raw: torch.Tensor, minimum: float) -> torch.Tensor:
        fractions = minimum + (1 - minimum * bins) * torch.softmax(raw, dim=-1)
        # the cumulative sum drifts by rounding: set both ends exactly, keep the interior
        interior = 2 * bound * torch.cumsum(fractions, dim=-1)[..., :-1] - bound
        ends = raw.new_full((*raw.shape[:-1], 1), bound)
        return torch.cat([-ends, interior, ends], dim=-1)

    shift = math.log(math.expm1(1 - min_derivative))
    inner = min_derivative + F.softplus(derivatives + shift)
    ones = derivatives.new_ones((*derivatives.shape[:-1], 1))
    return knots(widths, min_width), knots(heights, min_height), \
        torch.cat([ones, inner, ones], dim=-1)


def rational_quadratic_spline(x: torch.Tensor, widths: torch.Tensor, heights: torch.Tensor,
                              derivatives: torch.Tensor, *, inverse: bool, bound: float,
                              min_width: float = 1e-3, min_height: float = 1e-3,
                              min_derivative: float = 1e-3) -> Pair:
    """Elementwise monotone spline on ``[-bound, bound]``, identity outside: ``(y, ladj)``.

    ``x``: any shape ``S``; ``widths``, ``heights``: ``S + (K,)``; ``derivatives``:
    ``S + (K - 1,)`` (raw values, see the module docstring). ``inverse=False`` evaluates the
    spline and returns ``log(dy/dx)`` elementwise (shape ``S``); ``inverse=True`` evaluates its
    inverse and returns ``log(dx/dy)``. Outside the interval both are the identity with log
    derivative 0. Any finite input gives finite values and gradients: the spline branch is
    always evaluated at an input clamped into the interval, so the branch that
    :func:`torch.where` discards cannot leak NaN into the gradients.
    """
    xk, yk, dk = spline_knots(widths, heights, derivatives, bound=bound, min_width=min_width,
                              min_height=min_height, min_derivative=min_derivative)
    lead = torch.broadcast_shapes(x.shape, xk.shape[:-1])
    xk, yk, dk = (t.expand(*lead, t.shape[-1]) for t in (xk, yk, dk))
    x = x.expand(lead)

    inside = (x >= -bound) & (x <= bound)
    safe = x.clamp(-bound, bound)
    # the bin whose left knot is the last one <= the input (the last bin holds +bound)
    search = (yk if inverse else xk)[..., 1:-1].contiguous()
    idx = torch.searchsorted(search, safe.unsqueeze(-1).contiguous(), right=True)

    def at(t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return t.gather(-1, idx + offset).squeeze(-1)

    x_lo, y_lo, d_lo, d_hi = at(xk), at(yk), at(dk), at(dk, 1)
    width, height = at(xk, 1) - x_lo, at(yk, 1) - y_lo
    slope = height / width
    curvature = d_hi + d_lo - 2 * slope

    if inverse:
        dy = safe - y_lo
        a = height * (slope - d_lo) + dy * curvature
        b = height * d_lo - dy * curvature
        c = -slope * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp(min=0))
        # The root in [0, 1], in whichever form adds two terms of the same sign: with b >= 0,
        # 2c / (-b - root) (this also gives xi = 0 exactly at y = y_lo); with b < 0 (a steep
        # right end, d_hi > 2 slope), where that denominator would cancel, (root - b) / 2a, and
        # there a > 0. The unused branch gets harmless denominators: torch.where would still
        # send a NaN from it into the gradients.
        positive_b = b >= 0
        xi = torch.where(positive_b,
                         2 * c / torch.where(positive_b, -b - root, -1.0),
                         (root - b) / torch.where(positive_b, 1.0, 2 * a)).clamp(0, 1)
        out = x_lo + xi * width
    else:
        xi = ((safe - x_lo) / width).clamp(0, 1)
    mix = xi * (1 - xi)
    denom = slope + curvature * mix
    if not inverse:
        out = y_lo + height * (slope * xi * xi + d_lo * mix) / denom
    log_grad = 2 * torch.log(slope) \
        + torch.log(d_hi * xi * xi + 2 * slope * mix + d_lo * (1 - xi) * (1 - xi)) \
        - 2 * torch.log(denom)
    if inverse:
        log_grad = -log_grad
    return torch.where(inside, out, x), torch.where(inside, log_grad, torch.zeros_like(log_grad))


def _spline_params(raw: torch.Tensor, bins: int):
    return raw[..., :bins], raw[..., bins:2 * bins], raw[..., 2 * bins:]


def _check_bins_bound(bins, bound) -> int:
    bins = _positive_int(bins, "bins")
    _check_spline_options(bound, 1e-3, 1e-3, 1e-3, bins)
    return bins


class RQSCoupling(Transform):
    """Spline coupling on vectors ``(batch, dim)``: the features with ``index % 2 == parity``
    pass unchanged, the others go through :func:`rational_quadratic_spline` with parameters
    from an MLP of the kept features (and the context).

    ``forward`` is data -> noise (the spline), ``inverse`` noise -> data (its inverse); both are
    one pass. Built with a zero last layer, the transform starts at the identity.
    """

    def __init__(self, dim: int, bins: int = 8, bound: float = 3.0,
                 hidden: Sequence[int] = (64, 64), context_dim: int | None = None,
                 parity: int = 0):
        super().__init__()
        dim = _positive_int(dim, "dim")
        if dim < 2:
            raise ConfigError(f"a coupling layer needs dim >= 2 (one half conditions the "
                              f"other), got {dim}")
        if parity not in (0, 1) or isinstance(parity, bool):
            raise ConfigError(f"parity must be 0 or 1, got {parity!r}")
        if context_dim is not None:
            context_dim = _positive_int(context_dim, "context_dim")
        self.bins = _check_bins_bound(bins, bound)
        self.dim, self.bound, self.context_dim, self.parity = dim, float(bound), context_dim, parity
        index = torch.arange(dim)
        self.register_buffer("kept", index[index % 2 == parity], persistent=False)
        self.register_buffer("changed", index[index % 2 != parity], persistent=False)
        self.net = MLP(len(self.kept) + (context_dim or 0),
                       len(self.changed) * (3 * self.bins - 1), hidden)

    def _run(self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool) -> Pair:
        check_vectors(x, self.dim, type(self).__name__)
        context = check_context(context, x.shape[0], self.context_dim, x)
        raw = self.net(with_context(x[:, self.kept], context))
        raw = raw.reshape(x.shape[0], len(self.changed), 3 * self.bins - 1)
        z, ladj = rational_quadratic_spline(x[:, self.changed], *_spline_params(raw, self.bins),
                                            inverse=inverse, bound=self.bound)
        out = x.clone()
        out[:, self.changed] = z
        return out, ladj.sum(dim=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` (batch, dim) -> noise ``y`` (batch, dim), ``log|det dy/dx|`` (batch,)."""
        return self._run(x, context, inverse=False)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` (batch, dim) -> data ``x`` (batch, dim), ``log|det dx/dy|`` (batch,)."""
        return self._run(y, context, inverse=True)


class RQSAutoregressive(Transform):
    """Autoregressive spline on vectors ``(batch, dim)``: feature ``i`` goes through
    :func:`rational_quadratic_spline` with parameters from a MADE of the features before it in
    ``order`` (and the context).

    ``forward`` (data -> noise, density) is one MADE pass; ``inverse`` (noise -> data,
    sampling) takes ``dim`` passes. Starts at the identity (the MADE's output layer is zero).
    """

    def __init__(self, dim: int, bins: int = 8, bound: float = 3.0,
                 hidden: Sequence[int] = (64, 64), context_dim: int | None = None,
                 order: Sequence[int] | None = None):
        super().__init__()
        self.bins = _check_bins_bound(bins, bound)
        self.made = MADE(dim, 3 * self.bins - 1, hidden, context_dim, order)
        self.dim, self.bound = self.made.dim, float(bound)
        self.context_dim = self.made.context_dim

    def _spline(self, x: torch.Tensor, params_from: torch.Tensor, context: torch.Tensor | None,
                inverse: bool) -> Pair:
        raw = self.made(params_from, context)
        return rational_quadratic_spline(x, *_spline_params(raw, self.bins), inverse=inverse,
                                         bound=self.bound)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` (batch, dim) -> noise ``y`` (batch, dim), ``log|det dy/dx|`` (batch,)."""
        check_vectors(x, self.dim, type(self).__name__)
        context = check_context(context, x.shape[0], self.context_dim, x)
        y, ladj = self._spline(x, x, context, inverse=False)
        return y, ladj.sum(dim=1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` (batch, dim) -> data ``x`` (batch, dim), ``log|det dx/dy|`` (batch,).

        Pass ``k`` makes the first ``k + 1`` features in the order exact; the last pass reads
        an ``x`` exact in every feature its parameters depend on, so its log-derivative is the
        final one.
        """
        check_vectors(y, self.dim, type(self).__name__)
        context = check_context(context, y.shape[0], self.context_dim, y)
        x = torch.zeros_like(y)
        for _ in range(self.dim):
            x, ladj = self._spline(y, x, context, inverse=True)
        return x, ladj.sum(dim=1)


# Examples draw from the global RNG, so that a battery seeding it gets other parameters each time.
# Bound 2 with inputs of standard deviation 1.5: about a fifth of the inputs land in the tails.
# Weights std 0.2 on top of the initialisation: clearly away from the identity (mean |ladj| about
# 0.5-1) without bins so flat that float32 round trips lose much to their conditioning.
@register_example("rqs-coupling", (4,), scale=1.5)
def _coupling_example() -> Transform:
    return randomize_(RQSCoupling(4, bins=5, bound=2.0, hidden=(16, 16)), std=0.2)


@register_example("rqs-coupling-conditional", (4,), context_dim=3, scale=1.5)
def _coupling_conditional_example() -> Transform:
    return randomize_(RQSCoupling(4, bins=5, bound=2.0, hidden=(16, 16), context_dim=3,
                                  parity=1), std=0.2)


@register_example("rqs-autoregressive", (3,), scale=1.5)
def _autoregressive_example() -> Transform:
    return randomize_(RQSAutoregressive(3, bins=5, bound=2.0, hidden=(16, 16)), std=0.2)


@register_example("rqs-autoregressive-conditional", (3,), context_dim=2, scale=1.5)
def _autoregressive_conditional_example() -> Transform:
    return randomize_(RQSAutoregressive(3, bins=5, bound=2.0, hidden=(16, 16), context_dim=2,
                                        order=(2, 0, 1)), std=0.2)
