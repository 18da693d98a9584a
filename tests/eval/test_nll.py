import math

import numpy as np
import pytest
import torch

from flowlab.data import get_dataset
from flowlab.errors import ConfigError
from flowlab.eval import evaluate_nll, heldout_points, mean_and_se


class Gaussian:
    """A closed-form density: N(mu, s^2 I) in 2-D."""

    def __init__(self, mu: float, s: float):
        self.mu, self.s = mu, s

    def log_prob(self, x):
        return (-0.5 * ((x - self.mu) / self.s).pow(2) - math.log(self.s)
                - 0.5 * math.log(2 * math.pi)).sum(1)


def test_mean_and_standard_error_match_numpy():
    values = torch.randn(1000, dtype=torch.float64) * 3 + 1
    mean, se = mean_and_se(values)
    arr = values.numpy()
    assert mean == pytest.approx(arr.mean())
    assert se == pytest.approx(arr.std(ddof=1) / math.sqrt(arr.size))


def test_evaluate_nll_of_closed_form_density_reaches_its_entropy():
    density = Gaussian(0.5, 2.0)
    points = 0.5 + 2.0 * torch.randn(20000, 2, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(1))
    result = evaluate_nll(density, points, batch_size=3000, entropy=2 * (0.5 * math.log(
        2 * math.pi * math.e) + math.log(2.0)))
    assert result.n_test == 20000
    assert abs(result.gap_nats) < 3 * result.nll_se
    assert result.nll_se == pytest.approx(
        float((-density.log_prob(points)).std()) / math.sqrt(20000), rel=1e-6)
    # a wrong density is detected: too narrow a Gaussian is far above the entropy
    wrong = evaluate_nll(Gaussian(0.5, 1.0), points, entropy=result.entropy_nats,
                         reference=density)
    assert wrong.gap_nats > 10 * wrong.nll_se
    # paired KL(p || q) for two Gaussians: 2 * (log(s_p/s_q)... ) in closed form
    s_p, s_q = 2.0, 1.0
    kl_exact = 2 * (math.log(s_q / s_p) + s_p**2 / (2 * s_q**2) - 0.5)
    assert abs(wrong.kl_nats - kl_exact) < 4 * wrong.kl_se
    assert wrong.kl_se < 0.1 * kl_exact
    itself = evaluate_nll(density, points, reference=density)
    assert itself.kl_nats == 0.0 and itself.kl_se == 0.0


def test_heldout_points_are_fixed_and_not_the_training_stream():
    data = get_dataset("8gaussians")
    a = heldout_points(data, 100)
    b = heldout_points(data, 100)
    assert torch.equal(a, b) and a.dtype == torch.float64
    train = data.sample(100, generator=torch.Generator().manual_seed(1))
    assert not np.allclose(a.numpy(), train.double().numpy())


def test_evaluate_nll_rejects_a_single_point():
    with pytest.raises(ConfigError):
        evaluate_nll(Gaussian(0, 1), torch.zeros(1, 2))


@pytest.mark.parametrize("name", ["8gaussians", "checkerboard", "2spirals", "pinwheel", "rings",
                                  "circles", "moons", "swissroll"])
def test_true_density_evaluated_like_a_model_reaches_its_entropy(name):
    """The evaluation pipeline itself, run on the exact density, lands on H within 3 s.e."""
    data = get_dataset(name)
    result = evaluate_nll(data, heldout_points(data, 20000), entropy=data.entropy)
    assert result.n_test == 20000 and result.estimator == "closed form"
    assert abs(result.gap_nats) < 3 * result.nll_se + 1e-9, result  # checkerboard: se = 0
