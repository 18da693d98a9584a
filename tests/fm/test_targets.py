"""The averaged flow-matching target: brute force, a Gaussian's marginal velocity, and its use."""

import math

import pytest
import torch

from flowlab.errors import ConfigError
from flowlab.fm import LinearPath, VPPath, averaged_velocity
from flowlab.models import CFM, build_model

F64 = torch.float64


def _path_gaussian(path, t):
    """(a, sigma) of x_t | x ~ N(a x, sigma^2 I), written out independently of the library."""
    if isinstance(path, LinearPath):
        return 1 - t, path.sigma_min + (1 - path.sigma_min) * t
    return math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)


@pytest.mark.parametrize("path", [LinearPath(1e-4), LinearPath(0.0), LinearPath(0.1), VPPath()])
def test_averaged_target_is_the_batch_posterior_mean_of_the_conditional_velocities(path):
    """Brute force: for each row, weight every batch point by N(x_t; a x_j, sigma^2 I) and
    average the conditional velocities u_t(x_t | x_j) of the path at the row's x_t."""
    gen = torch.Generator().manual_seed(3)
    n = 9
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    x[4] = x[3] + 0.02  # a near neighbour, so that some rows really average
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    t = torch.rand(n, generator=gen, dtype=F64)
    t[0], t[1] = 0.999, 0.3
    point, velocity = path.point_and_velocity(x, z, t)
    target = averaged_velocity(path, x, z, t, velocity)
    for i in range(n):
        a, sigma = _path_gaussian(path, float(t[i]))
        logw = -(point[i] - a * x).pow(2).sum(1) / (2 * sigma**2)
        w = torch.softmax(logw, 0)
        # the conditional velocity of data point x_j at the point x_t = point[i]
        noise = (point[i] - a * x) / sigma
        u = torch.stack([path.point_and_velocity(x[j:j + 1], noise[j:j + 1], t[i:i + 1])[1][0]
                         for j in range(n)])
        torch.testing.assert_close(target[i], (w[:, None] * u).sum(0), rtol=1e-9, atol=1e-9)
    # near the noise end the rows really are averages, not their own conditional velocity
    assert float((target[0] - velocity[0]).abs().max()) > 0.1


@pytest.mark.parametrize("path", [LinearPath(0.0), VPPath()])
def test_at_the_data_end_the_target_is_the_conditional_velocity(path):
    """At t = 0 with no blur only x_i could have produced x_t: no 0 / 0, no average."""
    x, z = torch.randn(16, 2, dtype=F64), torch.randn(16, 2, dtype=F64)
    t = torch.zeros(16, dtype=F64)
    _, velocity = path.point_and_velocity(x, z, t)
    target = averaged_velocity(path, x, z, t, velocity)
    assert torch.equal(target, velocity)


@pytest.mark.parametrize("path", [LinearPath(0.05), VPPath()])
def test_averaged_target_estimates_the_marginal_velocity_of_a_gaussian(path):
    """Data N(mu, s^2 I): x_t is Gaussian and E[x | x_t] has a closed form, hence so does the
    marginal velocity the field should learn. The averaged target must be far closer to it
    than the conditional one (variance), with a mean error within noise plus the O(1 / batch)
    bias. The rows of one batch share its reference points, so the noise of the mean error
    is judged from the spread of the batch means."""
    gen = torch.Generator().manual_seed(0)
    mu, s, batch = torch.tensor([1.0, -0.5], dtype=F64), 0.7, 256
    for t_value in (0.1, 0.5, 0.9):
        a, sigma = _path_gaussian(path, t_value)
        averaged, conditional = [], []
        for _ in range(40):
            x = mu + s * torch.randn(batch, 2, generator=gen, dtype=F64)
            z = torch.randn(batch, 2, generator=gen, dtype=F64)
            t = torch.full((batch,), t_value, dtype=F64)
            point, velocity = path.point_and_velocity(x, z, t)
            posterior_mean = mu + a * s**2 / (a**2 * s**2 + sigma**2) * (point - a * mu)
            # the path's velocity is affine in the data point: u(x_t | E[x | x_t]) is the mean
            noise = (point - a * posterior_mean) / sigma
            _, marginal = path.point_and_velocity(posterior_mean, noise, t)
            averaged.append(averaged_velocity(path, x, z, t, velocity) - marginal)
            conditional.append(velocity - marginal)
        err_avg, err_cond = torch.cat(averaged), torch.cat(conditional)
        mse_avg, mse_cond = float(err_avg.pow(2).mean()), float(err_cond.pow(2).mean())
        assert mse_avg < mse_cond / 8, (t_value, mse_avg, mse_cond)
        # the conditional target is unbiased: its mean error is noise, within 5 s.e.
        se_cond = math.sqrt(mse_cond / err_cond.shape[0])
        assert float(err_cond.mean(0).abs().max()) < 5 * se_cond
        # the averaged one is biased by O(1 / batch) only
        batch_means = torch.stack([e.mean(0) for e in averaged])
        se_avg = batch_means.std(0) / math.sqrt(len(averaged))
        excess = batch_means.mean(0).abs() - 5 * se_avg
        assert float(excess.max()) < 2 / batch, (t_value, batch_means.mean(0), se_avg)


def test_averaged_target_needs_independent_pairs():
    with pytest.raises(ConfigError, match="independent"):
        CFM(2, hidden=(8,), coupling="ot", target="averaged")
    with pytest.raises(ConfigError, match="unknown flow-matching target"):
        CFM(2, hidden=(8,), target="mean")
    model = CFM(2, hidden=(8,), target="averaged")
    x = torch.randn(8, 2)
    with pytest.raises(ConfigError, match="given pairs"):
        model.training_loss(x, torch.randn(8, 2))


def test_cfm_regresses_the_field_on_the_averaged_target_and_keeps_the_option():
    torch.manual_seed(0)
    model = CFM(2, hidden=(16,), sigma_min=0.0, target="averaged").double()
    x = torch.randn(256, 2, dtype=F64) * 0.3 + torch.tensor([1.0, 0.0], dtype=F64)
    torch.manual_seed(5)
    loss = model.training_loss(x).loss
    torch.manual_seed(5)
    z = torch.randn_like(x)
    t = model.sample_times(256, x)
    point, velocity = model.path.point_and_velocity(x, z, t)
    target = averaged_velocity(model.path, x, z, t, velocity)
    expected = (model.blocks[0].field(t, point) - target).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    rebuilt = build_model("cfm", **model.config())
    assert rebuilt.options["target"] == "averaged"
    assert build_model("cfm", **{**model.config(), "target": "conditional"}).options[
        "target"] == "conditional"
