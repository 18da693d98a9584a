"""Test bits per dimension of an image model, with its standard errors over test images and
over the estimator's own noise.

Every test image is dequantized with noise from a fixed seed, mapped to the model's space,
and scored: ``bpd = -(log p(y) + ldj) / (D ln 2)`` (see :mod:`flowlab.data.preprocess`). The
mean over images is reported with the standard error of that mean, and the number of images
it is over (the whole test split unless a random subset is asked for).

Stochastic scores. With the Hutchinson divergence a CNF's log-density is an unbiased estimate:
``log N(z(T))`` does not depend on the probe and the probe only enters the trace integral,
which is linear in it. With variational dequantization (a model that samples its own
dequantization noise ``u ~ q(u|x)``) the score is a one-sample estimate of the variational
bound. Either way each image is scored ``probes`` times with independent draws (from
generators seeded with the fixed :data:`~flowlab.eval.nll.TEST_SEED`, so an evaluation is
reproducible), and its value is the mean of those scores: still unbiased for the same target.
Two standard errors are then reported:

* ``bpd_se``: over images, of the per-image means (what a different test set would change;
  it includes the estimator's noise);
* ``estimator_se``: the estimator's share alone, the standard error of the reported mean as
  an estimate of the mean of the images' expected scores:
  ``sqrt(sum_i s_i^2 / K) / N`` with ``s_i^2`` the sample variance of image ``i``'s ``K``
  scores. It needs ``K >= 2`` (None with one probe); it is 0 for a deterministic score (exact
  divergence, uniform dequantization), where only ``probes=1`` is allowed.

Under uniform dequantization the noise ``u`` is drawn once per image, as with one probe, so
the probes average the Hutchinson noise at that ``u``; under variational dequantization every
draw takes a fresh ``u`` (and a fresh probe).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from flowlab.errors import ConfigError, NonFiniteError
from flowlab.eval.nll import TEST_SEED, mean_and_se

STOCHASTIC_DEFAULT_PROBES = 4  # `flowlab eval`'s default when the score is stochastic


@dataclass
class BPDResult:
    """Mean test bits/dim and how it was computed.

    Attributes:
        bits_per_dim: mean over images of each image's (probe-averaged) bits/dim.
        bpd_se: standard error of that mean over images.
        n_test, n_total: images scored, and in the whole test split.
        seconds: wall time of the evaluation.
        nfe: mean function evaluations per ODE solve (CNFs; None otherwise).
        estimator: divergence of a CNF (``exact``, ``hutchinson``) or ``closed form``.
        solver: the ODE solver of a CNF.
        probes: independent scores averaged per image.
        estimator_se: standard error of ``bits_per_dim`` due to the estimator's noise alone
            (0 for a deterministic score; None when stochastic with a single probe).
        dequantization: ``uniform`` or ``variational``; either way ``bits_per_dim`` is an
            upper bound (in expectation) on the discrete images' bits/dim.
    """

    bits_per_dim: float
    bpd_se: float
    n_test: int
    n_total: int
    seconds: float
    nfe: float | None = None
    estimator: str = "exact"
    solver: str = ""
    probes: int = 1
    estimator_se: float | None = 0.0
    dequantization: str = "uniform"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimator_standard_error(scores: torch.Tensor) -> float | None:
    """Standard error, due to the estimator alone, of the mean over images of ``(N, K)``
    scores (``K`` independent draws per image): ``sqrt(sum_i s_i^2 / K) / N`` with ``s_i^2``
    the unbiased sample variance of row ``i``. None when ``K < 2``."""
    if scores.ndim != 2:
        raise ConfigError(f"scores must be (images, probes), got shape {tuple(scores.shape)}")
    n, k = scores.shape
    if k < 2:
        return None
    within = scores.double().var(dim=1, unbiased=True)
    return math.sqrt(float(within.sum()) / k) / n


def _check_probes(probes: int) -> int:
    if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
        raise ConfigError(f"probes must be an int >= 1 (scores averaged per image), got "
                          f"{probes!r}")
    return int(probes)


def _dequantization(model, task) -> str:
    """The task's dequantization, checked against the model's (a variational one samples
    its own noise and must be handed raw pixels)."""
    task_kind = getattr(task, "dequantization", "uniform")
    model_kind = getattr(model, "dequantization", "uniform")
    if task_kind != model_kind:
        raise ConfigError(f"the model uses {model_kind} dequantization but the data task "
                          f"{task_kind}; evaluate a run with the task it was trained with")
    return task_kind


def score_is_stochastic(model, task, divergence: str | None = None, solver=None) -> bool:
    """Whether an image's score varies between draws: the Hutchinson divergence, or a model
    that samples its own (variational) dequantization noise."""
    if _dequantization(model, task) == "variational":
        return True
    if (solver or getattr(model, "eval_solver", None)) is None:
        return False  # no ODE: the change of variables is closed form
    used = divergence or getattr(model, "options", {}).get("eval_divergence", "exact")
    return used == "hutchinson"


def evaluate_bits_per_dim(model, task, test, *, n_test: int | None = None,
                          batch_size: int = 500, solver=None, divergence: str | None = None,
                          probes: int = 1, dtype: torch.dtype = torch.float64,
                          progress: Callable[[str], None] | None = None) -> BPDResult:
    """Bits/dim of ``test`` (an :class:`~flowlab.data.images.ImageData`) under ``model``.

    ``task`` is the :class:`~flowlab.data.image_task.ImageTask` the model was trained on (its
    preprocessing and layout). ``n_test``: score a random subset of that many images (drawn
    with a fixed seed) instead of the whole test split. CNF models take ``solver`` and
    ``divergence`` as in :func:`~flowlab.eval.nll.evaluate_nll`. ``probes``: independent
    scores averaged per image when the score is stochastic (Hutchinson divergence, variational
    dequantization; see the module docstring); a deterministic score takes only 1.
    ``progress`` is called with a line after each batch of images and probe (an evaluation by
    the ODE can take many minutes).
    """
    probes = _check_probes(probes)
    dequantization = _dequantization(model, task)
    stochastic = score_is_stochastic(model, task, divergence, solver)
    if probes > 1 and not stochastic:
        raise ConfigError(f"probes={probes}: this score is deterministic (exact divergence or "
                          "closed form, uniform dequantization), so repeating it changes "
                          "nothing; use probes=1, or the Hutchinson divergence")
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
    used_solver = solver or getattr(model, "eval_solver", None)
    # Only an ODE model takes a solver and a divergence; every log_prob_with_stats takes the
    # generator of its random draws (probes, dequantization noise).
    ode_options = {"solver": solver, "divergence": divergence} if used_solver is not None else {}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(TEST_SEED)  # uniform dequantization noise
    probe_generator = torch.Generator(device=ref.device).manual_seed(TEST_SEED)
    values, nfes, done = [], [], 0.0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                y, ldj = task.to_model(chunk, generator, dtype=dtype)
                y = y.to(ref)
                scores = []
                for _ in range(probes):
                    if hasattr(model, "log_prob_with_stats"):
                        logp, stats = model.log_prob_with_stats(
                            y, generator=probe_generator, **ode_options)
                        if stats:
                            nfes.append(sum(s.nfe_forward for s in stats))
                    else:
                        logp = model.log_prob(y)
                    scores.append(-(logp.double().cpu() + ldj.double())
                                  / (task.dim * math.log(2)))
                    if progress is not None:
                        done += len(chunk) / probes
                        so_far = torch.cat([v.mean(dim=1) for v in
                                            [*values, torch.stack(scores, dim=1)]])
                        elapsed = time.perf_counter() - start
                        first = sum(len(v) for v in values)
                        progress(f"eval: {100 * done / len(images):.0f}% (images {first + 1}-"
                                 f"{first + len(chunk)} of {len(images)}, probe {len(scores)} "
                                 f"of {probes}), {so_far.mean():.4f} bits/dim so far, "
                                 f"{elapsed:.0f} s, about "
                                 f"{max(0.0, elapsed * (len(images) / done - 1)):.0f} s to go")
                values.append(torch.stack(scores, dim=1))
    finally:
        model.train(was_training)
    bpd = torch.cat(values)  # (images, probes)
    if torch.isnan(bpd).any():
        raise NonFiniteError(f"{int(torch.isnan(bpd).sum())} of {bpd.numel()} test "
                             "log-densities are NaN")
    mean, se = mean_and_se(bpd.mean(dim=1))
    return BPDResult(
        bits_per_dim=mean, bpd_se=se, n_test=bpd.shape[0], n_total=total,
        seconds=time.perf_counter() - start, nfe=(sum(nfes) / len(nfes)) if nfes else None,
        estimator=(divergence or getattr(model, "options", {}).get("eval_divergence", "exact"))
        if used_solver is not None else "closed form",
        solver=used_solver.describe() if used_solver is not None else "",
        probes=probes,
        estimator_se=estimator_standard_error(bpd) if stochastic else 0.0,
        dequantization=dequantization,
    )
