"""Negative log-likelihood in nats on fresh held-out data, with its standard error.

The test points are drawn from the data generator with a fixed seed that no training run
uses, so every evaluation of a dataset sees the same points and never the training stream.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch

from flowlab.errors import ConfigError, NonFiniteError
from flowlab.ode import SolverConfig

TEST_SEED = 2_147_483_647  # training streams are seeded with small seeds + 1


class Density(Protocol):
    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class NLLResult:
    """Mean NLL in nats with the standard error over test points, and how it was computed.

    ``gap_nats`` is NLL minus the true entropy H; its uncertainty is ``nll_se``, which includes
    the test sample's own fluctuation around H. When the true density is known, ``kl_nats`` is
    the paired estimate of KL(data || model) = mean over the same points of
    ``log p_true - log p_model``, whose standard error ``kl_se`` is free of that fluctuation.
    """

    nll_nats: float
    nll_se: float
    n_test: int
    seconds: float
    nfe: float | None = None
    estimator: str = "exact"
    solver: str = ""
    entropy_nats: float | None = None
    kl_nats: float | None = None
    kl_se: float | None = None

    @property
    def gap_nats(self) -> float | None:
        return None if self.entropy_nats is None else self.nll_nats - self.entropy_nats

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap_nats": self.gap_nats}


def heldout_points(dataset, n_test: int, seed: int = TEST_SEED) -> torch.Tensor:
    """The fixed held-out points of a dataset (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return dataset.sample(n_test, generator=generator, dtype=torch.float64)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(values.mean()), se


def evaluate_nll(
    model,
    points: torch.Tensor,
    *,
    batch_size: int = 5000,
    solver: SolverConfig | None = None,
    divergence: str | None = None,
    entropy: float | None = None,
    reference: Density | None = None,
) -> NLLResult:
    """NLL of ``points`` under ``model`` (a flowlab model or anything with ``log_prob``).

    flowlab models are evaluated in eval mode with their ``eval_solver`` (tight tolerance) and
    ``eval_divergence`` (exact) unless ``solver``/``divergence`` are given; the NFE reported is
    the mean number of function evaluations per batch solve. With ``reference`` (the true
    density) the paired KL estimate is computed on the same points.

    Inside a torch.distributed process group (``torchrun``) each rank evaluates every
    ``world_size``-th point and the per-point values are gathered, so every rank returns the
    result for all of ``points`` (a collective: every rank must call it with the same points).
    """
    from flowlab.train.distributed import context

    ranks = context()
    if points.ndim < 2 or points.shape[0] < 2:
        raise ConfigError(f"need at least 2 test points, got shape {tuple(points.shape)}")
    is_module = isinstance(model, torch.nn.Module)
    was_training = model.training if is_module else False
    ref = next(model.parameters(), None) if is_module else None
    if is_module:
        model.eval()
    values, nfes = [], []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for chunk in points[ranks.rank::ranks.world_size].split(batch_size):
                chunk = chunk.to(ref) if ref is not None else chunk
                if hasattr(model, "log_prob_with_stats"):
                    logp, stats = model.log_prob_with_stats(
                        chunk, solver=solver, divergence=divergence
                    )
                    nfes.append(sum(s.nfe_forward for s in stats))
                else:
                    logp = model.log_prob(chunk)
                values.append(-logp.double().cpu())
    finally:
        if is_module:
            model.train(was_training)
    nll = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    if ranks.active:
        shards = ranks.gather((nll, nfes))
        nll = torch.empty(points.shape[0], dtype=torch.float64)
        for rank, (shard, _) in enumerate(shards):
            nll[rank::ranks.world_size] = shard
        nfes = [n for _, shard_nfes in shards for n in shard_nfes]
    seconds = time.perf_counter() - start
    # An infinite NLL is a real (terrible) result and is reported; a NaN is a bug.
    if torch.isnan(nll).any():
        bad = int(torch.isnan(nll).sum())
        raise NonFiniteError(f"{bad} of {nll.numel()} test log-densities are NaN")
    mean, se = mean_and_se(nll)
    kl = kl_se = None
    if reference is not None:
        with torch.no_grad():
            true_nll = torch.cat([-reference.log_prob(c).double().cpu()
                                  for c in points.split(batch_size)])
        kl, kl_se = mean_and_se(nll - true_nll)
    used_solver = solver or getattr(model, "eval_solver", None)
    used_div = divergence or getattr(model, "options", {}).get("eval_divergence", "exact")
    return NLLResult(
        nll_nats=mean, nll_se=se, n_test=nll.numel(), seconds=seconds,
        nfe=(sum(nfes) / len(nfes)) if nfes else None,
        estimator=used_div if used_solver is not None else "closed form",
        solver=used_solver.describe() if used_solver is not None else "",
        entropy_nats=entropy, kl_nats=kl, kl_se=kl_se,
    )
