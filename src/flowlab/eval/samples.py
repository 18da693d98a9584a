"""Quality of samples from a model of a 2-D toy density, and how it changes with the NFE spent.

The toy densities' exact log-density ``log p`` is known, so samples ``x ~ q`` from a model are
scored two ways, because neither is enough alone:

* the cross-entropy ``E_q[-log p(x)] = H(q) + KL(q || p)`` in nats, next to the true entropy
  ``H(p)``. It is not bounded below by ``H(p)``: a model that piles its samples onto the modes
  of ``p`` (small ``H(q)``) scores *below* ``H(p)``. Samples where ``p`` is zero (outside the
  checkerboard's cells) make ``KL(q || p)`` infinite; they are counted in ``outside_fraction``
  and the cross-entropy is the mean over the other samples.
* the squared maximum mean discrepancy to fresh data points, which is zero only when the
  sample distribution is the data distribution, so it catches mode collapse too.

The fresh data points come from the data generator with :data:`REFERENCE_SEED`: not the test
seed (:data:`~flowlab.eval.nll.TEST_SEED`), the validation seeds (10,000 + training seed) or the
training streams (training seed + 1), so the reference never overlaps the points a model was
fitted, selected or evaluated on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from flowlab.errors import ConfigError, DataError, NonFiniteError, SolverError
from flowlab.eval.nll import TEST_SEED, heldout_points, mean_and_se
from flowlab.ode import FIXED_GRID_SOLVERS, SolverConfig

REFERENCE_SEED = TEST_SEED - 1
BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BLOCKS = 10
ADAPTIVE = SolverConfig(solver="dopri5", atol=1e-5, rtol=1e-5)
# Entries of one (rows x points) float64 block of squared distances: 32 MiB.
_CHUNK_ELEMENTS = 1 << 22


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """``sum_i sum_j sum_h exp(-|a_i - b_j|^2 / (2 h^2))`` over all pairs, a float64 scalar.

    Distances are taken from coordinate differences (not from ``|a|^2 + |b|^2 - 2 a.b``), so a
    point's distance to itself is exactly 0 and a diagonal can be subtracted exactly.
    """
    rows = max(1, _CHUNK_ELEMENTS // max(1, b.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for chunk in a.split(rows):
        sq_dist = torch.cdist(chunk, b, compute_mode="donot_use_mm_for_euclid_dist").square_()
        kernel = torch.empty_like(sq_dist)
        for h in bandwidths:
            # Exponents below -700 are raised to it: exp(-700) ~ 1e-304 is nothing next to the
            # sum, and it keeps exp off the (10x slower) path of subnormal results.
            torch.mul(sq_dist, -0.5 / h**2, out=kernel).clamp_(min=-700.0)
            total += kernel.exp_().sum()
    return total


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> float:
    n, m = x.shape[0], y.shape[0]
    self_kernel = len(bandwidths)  # k(a, a): each Gaussian is 1 at distance 0
    xx = (_kernel_sum(x, x, bandwidths) - n * self_kernel) / (n * (n - 1))
    yy = (_kernel_sum(y, y, bandwidths) - m * self_kernel) / (m * (m - 1))
    xy = _kernel_sum(x, y, bandwidths) / (n * m)
    return float(xx + yy - 2 * xy)


def mmd2(
    x: torch.Tensor,
    y: torch.Tensor,
    bandwidths: Sequence[float] = BANDWIDTHS,
    blocks: int = BLOCKS,
) -> tuple[float, float]:
    """Unbiased estimate of the squared MMD between the laws of ``x`` ``(n, d)`` and ``y``
    ``(m, d)``, and its standard error.

    The kernel is a sum of Gaussians ``k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2))`` over the
    ``bandwidths`` (in data units), characteristic, so MMD^2 = 0 only for equal laws. The
    estimate averages ``k`` over distinct pairs within each sample and all pairs across them,
    so it is unbiased and may be negative. Computed in float64, in row chunks of bounded
    memory, on ``x``'s device.

    Standard error: both samples are cut, in row order (rows are assumed to be in random
    order), into ``blocks`` blocks of ``n // blocks`` and ``m // blocks`` rows (a remainder is
    left out of this step only); the unbiased estimate on each pair of blocks gives
    ``blocks`` independent estimates, and the s.e. of their mean is their standard deviation
    over ``sqrt(blocks)``. That mean has at least the variance of the all-pairs estimate
    returned: the s.e. is about right when the laws differ (variance ~ 1/n) and conservative,
    by up to ``sqrt(blocks)``, when they are equal (variance ~ 1/n^2). ``blocks=1`` gives NaN.

    Raises:
        ConfigError: not 2-D, different dimensions, fewer than ``2 * blocks`` rows in either
            sample, or bad ``bandwidths``/``blocks``.
        DataError: NaN or Inf entries.
    """
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"blocks must be an int >= 1, got {blocks!r}")
    bandwidths = tuple(float(h) for h in bandwidths)
    if not bandwidths or not all(h > 0 and math.isfinite(h) for h in bandwidths):
        raise ConfigError(f"bandwidths must be finite positive numbers, got {bandwidths}")
    if x.ndim != 2 or y.ndim != 2:
        raise ConfigError(
            f"mmd2 expects two (n, d) point sets, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise DataError(
            f"mmd2 needs points of the same dimension, got {x.shape[1]} and {y.shape[1]}"
        )
    if min(x.shape[0], y.shape[0]) < 2 * blocks:
        raise ConfigError(
            f"mmd2 with blocks={blocks} needs at least {2 * blocks} points in each sample, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    for name, points in (("x", x), ("y", y)):
        if not torch.isfinite(points).all():
            bad = int((~torch.isfinite(points)).any(dim=1).sum())
            raise DataError(f"mmd2: {bad} of {points.shape[0]} rows of {name} are NaN or Inf")
    estimate = _mmd2_unbiased(x, y, bandwidths)
    if blocks == 1:
        return estimate, float("nan")
    bx, by = x.shape[0] // blocks, y.shape[0] // blocks
    per_block = torch.tensor([
        _mmd2_unbiased(x[b * bx:(b + 1) * bx], y[b * by:(b + 1) * by], bandwidths)
        for b in range(blocks)
    ], dtype=torch.float64)
    return estimate, mean_and_se(per_block)[1]


@dataclass
class SampleQuality:
    """How close ``n`` samples are to a toy density (see the module docstring).

    Attributes:
        n: number of samples.
        cross_entropy, cross_entropy_se: mean of ``-log p_true`` in nats over the samples
            where the true density is positive, and its standard error.
        outside_fraction: share of samples where the true density is zero.
        mmd2, mmd2_se: squared MMD to fresh data points (:func:`mmd2`) and its standard error.
        entropy: the true entropy H in nats, to compare the cross-entropy with.
    """

    n: int
    cross_entropy: float
    cross_entropy_se: float
    outside_fraction: float
    mmd2: float
    mmd2_se: float
    entropy: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_quality(
    samples: torch.Tensor,
    dataset,
    reference: torch.Tensor | None = None,
    n_reference: int | None = None,
    seed: int = REFERENCE_SEED,
) -> SampleQuality:
    """Score ``samples`` ``(n, dim)`` against a toy density with exact ``log_prob``.

    ``reference`` holds fresh data points for the MMD; by default ``n_reference`` (default
    ``n``) points drawn with ``seed`` (:data:`REFERENCE_SEED`). The MMD uses the default
    :data:`BANDWIDTHS` and :data:`BLOCKS`, so both samples need at least ``2 * BLOCKS`` points.
    """
    if samples.ndim != 2 or samples.shape[1] != dataset.dim:
        raise ConfigError(
            f"expected samples of shape (n, {dataset.dim}), got {tuple(samples.shape)}"
        )
    if not torch.isfinite(samples).all():
        bad = int((~torch.isfinite(samples)).any(dim=1).sum())
        raise DataError(f"{bad} of {samples.shape[0]} samples are NaN or Inf")
    if reference is not None and n_reference is not None:
        raise ConfigError("give reference points or n_reference, not both")
    samples = samples.detach().to(torch.float64)
    if reference is None:
        reference = heldout_points(dataset, n_reference or samples.shape[0], seed=seed)
    reference = reference.to(samples)
    mmd, mmd_se = mmd2(samples, reference, BANDWIDTHS, BLOCKS)
    log_p = dataset.log_prob(samples).double()
    inside = torch.isfinite(log_p)
    if inside.any():
        cross_entropy, cross_entropy_se = mean_and_se(-log_p[inside])
    else:
        cross_entropy = cross_entropy_se = float("nan")
    return SampleQuality(
        n=samples.shape[0], cross_entropy=cross_entropy, cross_entropy_se=cross_entropy_se,
        outside_fraction=1.0 - float(inside.double().mean()), mmd2=mmd, mmd2_se=mmd_se,
        entropy=float(dataset.entropy),
    )


def sampling_sweep(
    model,
    dataset,
    steps: Sequence[int] = (1, 2, 4, 8, 16),
    solvers: Sequence[str] = ("euler", "midpoint", "rk4"),
    adaptive: SolverConfig | None = ADAPTIVE,
    n: int = 5000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Sample quality against NFE: fixed-step solvers at each number of steps, and adaptive.

    Every row pushes the same ``n`` base points (drawn with ``seed``) noise -> data through
    ``model.to_data_with_stats`` without gradients, in eval mode (the mode is restored after),
    and scores them with :func:`sample_quality` against the same fresh data points. Rows
    follow ``solvers`` x ``steps``, then the ``adaptive`` solver (``None`` skips it); each has
    ``solver``, ``steps`` (None for adaptive), ``nfe`` (function evaluations, summed over the
    blocks' solves), ``seconds`` (the solves only), the :class:`SampleQuality` fields and
    ``error``: None, or why sampling gave no finite samples (quality fields are then None).
    """
    unknown = [s for s in solvers if s not in FIXED_GRID_SOLVERS]
    if unknown:
        raise ConfigError(
            f"sampling_sweep solvers must be fixed-grid ({', '.join(FIXED_GRID_SOLVERS)}); got "
            f"{unknown}; pass an adaptive solver as adaptive=SolverConfig(...)"
        )
    if n < 2 * BLOCKS:
        raise ConfigError(f"sampling_sweep needs n >= {2 * BLOCKS} samples, got {n}")
    if adaptive is not None and not adaptive.adaptive:
        raise ConfigError(f"adaptive must be an adaptive solver, got {adaptive.describe()}")
    configs = [SolverConfig(solver=s, steps=k) for s in solvers for k in steps]
    configs += [adaptive] if adaptive is not None else []
    ref = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *model.event_shape), generator=generator, dtype=ref.dtype)
    z = z.to(ref.device)
    reference = heldout_points(dataset, n, seed=REFERENCE_SEED)
    no_quality = dict.fromkeys(f.name for f in fields(SampleQuality))
    rows = []
    was_training = model.training
    model.eval()
    try:
        for config in configs:
            row = {"solver": config.solver, "steps": None if config.adaptive else config.steps}
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    x, stats = model.to_data_with_stats(z, solver=config)
                if not torch.isfinite(x).all():
                    raise NonFiniteError(f"{config.describe()}: non-finite samples")
            except (NonFiniteError, SolverError) as err:
                rows.append({**row, "nfe": None, "seconds": time.perf_counter() - start,
                             **no_quality, "error": str(err)})
                continue
            seconds = time.perf_counter() - start
            quality = sample_quality(x, dataset, reference=reference)
            rows.append({**row, "nfe": sum(s.nfe_forward for s in stats), "seconds": seconds,
                         **quality.to_dict(), "error": None})
    finally:
        model.train(was_training)
    return rows
