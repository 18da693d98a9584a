"""Bits/dim of a CNF scored with Hutchinson's estimator averaged over probes.

The probe-averaged value must agree with the exact-divergence value within a few of the
estimator's standard errors (with a fixed-step solver the Hutchinson estimate is unbiased for
exactly the number the exact divergence gives), that standard error must shrink like
1/sqrt(K), its formula must match a brute-force computation and the spread it predicts in a
simulation, and the evaluation must be reproducible from the fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowlab.data.images import ImageData
from flowlab.data.preprocess import Preprocess
from flowlab.errors import ConfigError
from flowlab.eval import estimator_standard_error, evaluate_bits_per_dim
from flowlab.eval.nll import TEST_SEED
from flowlab.models import FFJORD
from flowlab.ode import SolverConfig

F64 = torch.float64
LEVELS, SHAPE = 4, (1, 4, 4)
# A fixed grid: the state path does not depend on the divergence, and the trace integral is
# linear in the probe, so E[Hutchinson] equals the exact-divergence value of this solver.
RK4 = SolverConfig(solver="rk4", steps=6)


class TinyTask:
    """What evaluation uses of an ImageTask: 1x4x4 images with 4 levels, image layout."""

    dequantization = "uniform"

    def __init__(self) -> None:
        self.preprocess = Preprocess(LEVELS, alpha=0.05)
        self.event_shape = SHAPE
        self.dim = math.prod(SHAPE)

    def to_model(self, pixels, generator=None, dtype=torch.float32):
        y, ldj = self.preprocess(pixels, generator, dtype=dtype)
        return y.reshape(pixels.shape[0], *self.event_shape), ldj


@pytest.fixture(scope="module")
def setting():
    """A small conv-field FFJORD, its weights redrawn far from the identity (so the divergence,
    and the probes' noise, are not negligible), and 40 test images."""
    torch.manual_seed(1)
    model = FFJORD(image_shape=SHAPE, field="conv", hidden=(8, 8), T=1.0,
                   activation="softplus", eval_solver=RK4.to_dict()).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("sqrt_T"):
                p.normal_(0.0, 0.4)
    pixels = torch.randint(0, LEVELS, (40, *SHAPE), generator=torch.Generator().manual_seed(2))
    test = ImageData(pixels.to(torch.uint8), torch.zeros(40, dtype=torch.int64), LEVELS,
                     "tiny", "test")
    return model, TinyTask(), test


def evaluate(setting, **options):
    model, task, test = setting
    return evaluate_bits_per_dim(model, task, test, batch_size=16, **options)


def test_probe_average_agrees_with_exact_and_its_se_shrinks_like_one_over_sqrt_k(setting):
    exact = evaluate(setting, divergence="exact")
    assert exact.estimator == "exact" and exact.probes == 1 and exact.estimator_se == 0.0
    by_k = {k: evaluate(setting, divergence="hutchinson", probes=k) for k in (4, 16)}
    for k, result in by_k.items():
        assert result.estimator == "hutchinson" and result.probes == k
        assert result.n_test == 40 and result.estimator_se > 0
        # the same dequantization noise as the exact run: only the probes differ, so the
        # difference has exactly the estimator's standard error (two-sided)
        z = (result.bits_per_dim - exact.bits_per_dim) / result.estimator_se
        assert abs(z) < 4, (k, result, exact)
        # the estimator's noise is a small part of the spread over images here
        assert result.estimator_se < result.bpd_se
    ratio = by_k[4].estimator_se / by_k[16].estimator_se
    assert 1.5 < ratio < 2.7, ratio  # sqrt(16 / 4) = 2
    # the noise is real: a wrong (biased) value would be caught at this scale
    assert by_k[16].estimator_se > 1e-4


def test_hutchinson_probes_are_reproducible_and_one_probe_has_no_estimator_se(setting):
    a = evaluate(setting, divergence="hutchinson", probes=3)
    b = evaluate(setting, divergence="hutchinson", probes=3)
    assert a.bits_per_dim == b.bits_per_dim and a.estimator_se == b.estimator_se
    one = evaluate(setting, divergence="hutchinson", probes=1)
    assert one.estimator_se is None and one.probes == 1
    assert one.to_dict()["estimator_se"] is None
    assert math.isfinite(one.bits_per_dim) and one.bits_per_dim != a.bits_per_dim


def test_exact_score_is_unchanged_by_the_probe_machinery(setting):
    """With one probe and the exact divergence the result is the old single-pass value: the
    dequantization noise of the fixed seed, the model's log-density, -(logp + ldj)/(D ln 2)."""
    model, task, test = setting
    result = evaluate(setting, divergence="exact")
    generator = torch.Generator().manual_seed(TEST_SEED)
    model.eval()
    with torch.no_grad():
        values = []
        for chunk in test.images.split(16):
            y, ldj = task.to_model(chunk, generator, dtype=F64)
            logp = model.log_prob(y, divergence="exact")
            values.append(-(logp + ldj) / (task.dim * math.log(2)))
    values = torch.cat(values)
    assert result.bits_per_dim == pytest.approx(float(values.mean()), abs=1e-12)
    assert result.bpd_se == pytest.approx(float(values.std()) / math.sqrt(40), abs=1e-12)
    with pytest.raises(ConfigError, match="deterministic"):
        evaluate(setting, divergence="exact", probes=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="probes"):
            evaluate(setting, divergence="hutchinson", probes=bad)


def test_estimator_se_formula_equals_brute_force():
    scores = torch.randn(7, 5, dtype=F64, generator=torch.Generator().manual_seed(3))
    scores = scores * torch.linspace(0.5, 3.0, 7, dtype=F64)[:, None]
    n, k = scores.shape
    total = 0.0
    for row in scores.tolist():
        mean = sum(row) / k
        total += sum((v - mean) ** 2 for v in row) / (k - 1)
    assert estimator_standard_error(scores) == pytest.approx(math.sqrt(total / k) / n,
                                                              rel=1e-12)
    assert estimator_standard_error(scores[:, :1]) is None


def test_estimator_se_predicts_the_spread_of_the_reported_mean():
    """Simulation: images with fixed expected scores and per-image noise levels; over many
    repetitions the standard deviation of the mean over images equals the formula's value,
    and the formula's estimates average to it."""
    gen = torch.Generator().manual_seed(4)
    n, k, reps = 30, 6, 4000
    centres = torch.randn(n, dtype=F64, generator=gen) * 2
    noise_sd = torch.rand(n, dtype=F64, generator=gen) * 1.5 + 0.1
    scores = centres[None, :, None] + noise_sd[None, :, None] * torch.randn(
        reps, n, k, dtype=F64, generator=gen)
    truth = math.sqrt(float((noise_sd**2).sum()) / k) / n
    spread = float(scores.mean(dim=(1, 2)).std())
    assert spread == pytest.approx(truth, rel=0.06)
    estimates = torch.tensor([estimator_standard_error(s) for s in scores[:500]])
    assert float(estimates.mean()) == pytest.approx(truth, rel=0.03)


def test_progress_lines_count_batches_and_probes_and_end_at_the_result(setting):
    lines = []
    result = evaluate(setting, divergence="hutchinson", probes=2, progress=lines.append)
    assert len(lines) == 3 * 2  # 40 images in batches of 16, 16, 8; two probes each
    assert lines[0].startswith("eval: 20% (images 1-16 of 40, probe 1 of 2), ")
    assert lines[3].startswith("eval: 80% (images 17-32 of 40, probe 2 of 2), ")
    assert lines[-1].startswith("eval: 100% (images 33-40 of 40, probe 2 of 2), ")
    assert f"{result.bits_per_dim:.4f} bits/dim so far" in lines[-1]
    assert "0 s to go" in lines[-1]
