"""Test bits per dimension of an image model, with its standard error over test images.

Every test image is dequantized with noise from a fixed seed, mapped to the model's space,
and scored: ``bpd = -(log p(y) + ldj) / (D ln 2)`` (see :mod:`flowlab.data.preprocess`). The
mean over images is reported with the standard error of that mean, and the number of images
it is over (the whole test split unless a random subset is asked for).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flowlab.errors import ConfigError, NonFiniteError
from flowlab.eval.nll import TEST_SEED, mean_and_se


@dataclass
class BPDResult:
    bits_per_dim: float
    bpd_se: float
    n_test: int
    n_total: int
    seconds: float
    nfe: float | None = None
    estimator: str = "exact"
    solver: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_bits_per_dim(model, task, test, *, n_test: int | None = None,
                          batch_size: int = 500, solver=None, divergence: str | None = None,
                          dtype: torch.dtype = torch.float64) -> BPDResult:
    """Bits/dim of ``test`` (an :class:`~flowlab.data.images.ImageData`) under ``model``.

    ``task`` is the :class:`~flowlab.data.image_task.ImageTask` the model was trained on (its
    preprocessing and layout). ``n_test``: score a random subset of that many images (drawn
    with a fixed seed) instead of the whole test split. CNF models take ``solver`` and
    ``divergence`` as in :func:`~flowlab.eval.nll.evaluate_nll`.
    """
    total = len(test)
    if n_test is not None:
        if not 1 <= n_test <= total:
            raise ConfigError(f"--n-test must be between 1 and the {total} test images, got "
                              f"{n_test}")
        pick = torch.randperm(total, generator=torch.Generator().manual_seed(TEST_SEED))
        images = test.images[pick[:n_test].sort().values]
    else:
        images = test.images
    if images.shape[0] < 2:
        raise ConfigError("need at least 2 test images for a standard error")
    ref = next(model.parameters())
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(TEST_SEED)
    values, nfes = [], []
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                y, ldj = task.to_model(chunk, generator, dtype=dtype)
                y = y.to(ref)
                if hasattr(model, "log_prob_with_stats"):
                    logp, stats = model.log_prob_with_stats(y, solver=solver,
                                                            divergence=divergence)
                    nfes.append(sum(s.nfe_forward for s in stats))
                else:
                    logp = model.log_prob(y)
                bpd = -(logp.double().cpu() + ldj.double()) / (task.dim * math.log(2))
                values.append(bpd)
    finally:
        model.train(was_training)
    bpd = torch.cat(values)
    if torch.isnan(bpd).any():
        raise NonFiniteError(f"{int(torch.isnan(bpd).sum())} of {bpd.numel()} test "
                             "log-densities are NaN")
    mean, se = mean_and_se(bpd)
    used_solver = solver or getattr(model, "eval_solver", None)
    return BPDResult(
        bits_per_dim=mean, bpd_se=se, n_test=bpd.numel(), n_total=total,
        seconds=time.perf_counter() - start, nfe=(sum(nfes) / len(nfes)) if nfes else None,
        estimator=(divergence or "exact") if used_solver is not None else "closed form",
        solver=used_solver.describe() if used_solver is not None else "",
    )
