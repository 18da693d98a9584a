"""The averaged flow-matching target: brute force, a Gaussian's marginal velocity, and its use."""

import math

import pytest
import torch

from flowlab.errors import ConfigError
from flowlab.fm import LinearPath, VPPath, averaged_target, averaged_velocity
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


def _brute_target(path, x, t: float, y: torch.Tensor) -> torch.Tensor:
    """One row's averaged target at the point ``y`` (the batch ``x`` fixed), written out."""
    a, sigma = _path_gaussian(path, t)
    w = torch.softmax(-(y - a * x).pow(2).sum(1) / (2 * sigma**2), 0)
    noise = (y - a * x) / sigma
    tt = torch.full((x.shape[0],), t, dtype=F64)
    return (w[:, None] * path.point_and_velocity(x, noise, tt)[1]).sum(0)


@pytest.mark.parametrize("path", [LinearPath(1e-4), LinearPath(0.1), VPPath()])
def test_averaged_target_jacobian_is_that_of_the_batch_posterior_average(path):
    """The closed form (sigma'/sigma) I - gamma (a/sigma^2) Cov_w against autograd through the
    written-out average, in float64, for the chosen rows only (and in their order)."""
    gen = torch.Generator().manual_seed(5)
    n = 12
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    t = torch.linspace(0.2, 0.9, n, dtype=F64)
    point, velocity = path.point_and_velocity(x, z, t)
    rows = torch.tensor([7, 2, 11])
    target, jacobians = averaged_target(path, x, z, t, velocity, rows)
    torch.testing.assert_close(target, averaged_velocity(path, x, z, t, velocity))
    assert jacobians.shape == (3, 2, 2)
    for k, i in enumerate(rows.tolist()):
        expected = torch.autograd.functional.jacobian(
            lambda y, i=i: _brute_target(path, x, float(t[i]), y), point[i])
        torch.testing.assert_close(jacobians[k], expected, rtol=1e-9, atol=1e-9)
        # the covariance term matters: the conditional velocity's slope alone is off
        slope = torch.autograd.functional.jacobian(
            lambda y, i=i: path.point_and_velocity(x[i:i + 1], ((y - _path_gaussian(
                path, float(t[i]))[0] * x[i]) / _path_gaussian(path, float(t[i]))[1])[None],
                t[i:i + 1])[1][0], point[i])
        assert float((jacobians[k] - slope).abs().max()) > 1e-3
    assert averaged_target(path, x, z, t, velocity)[1] is None


class _Affine(torch.nn.Module):
    """v(t, y) = A y + b: its forward differences are its Jacobian A exactly (up to rounding)."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix)

    def forward(self, t, y):
        return y @ self.matrix.T + 0.5


def test_sobolev_term_regresses_the_field_jacobian_on_the_target_jacobian():
    """With an affine field the loss is the regression plus weight * sum over the first
    sobolev_rows rows with t >= sobolev_from of |A - J_target|_F^2, divided by the batch."""
    model = CFM(dim=2, target="averaged", hidden=(8,), sobolev=0.3, sobolev_from=0.5,
                sobolev_rows=3).to(F64)
    matrix = torch.tensor([[0.7, -0.2], [0.4, 1.3]], dtype=F64)
    model.blocks[0].field = _Affine(matrix.clone())
    gen = torch.Generator().manual_seed(2)
    n = 10
    x = torch.randn(n, 2, generator=gen, dtype=F64)
    z = torch.randn(n, 2, generator=gen, dtype=F64)
    t = torch.tensor([0.1, 0.6, 0.2, 0.9, 0.55, 0.7, 0.3, 0.8, 0.5, 0.4], dtype=F64)
    point, velocity = model.path.point_and_velocity(x, z, t)
    out = model._sobolev_loss(x, z, t, point, velocity)
    rows = torch.tensor([1, 3, 4])  # the first three rows with t >= 0.5
    target, jacobians = averaged_target(model.path, x, z, t, velocity, rows)
    regression = (point @ matrix.T + 0.5 - target).pow(2).sum(1).mean()
    sobolev = (matrix - jacobians).pow(2).sum((1, 2)).sum() / n
    torch.testing.assert_close(out.loss, regression + 0.3 * sobolev, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.tensor(out.metrics["sobolev_loss"], dtype=F64), sobolev,
                               rtol=1e-6, atol=1e-8)
    out.loss.backward()  # and the term trains the field
    assert float(model.blocks[0].field.matrix.grad.abs().sum()) > 0


@pytest.mark.parametrize("options, message", [
    ({"sobolev": 0.1}, "target='averaged'"),
    ({"sobolev": -1.0, "target": "averaged"}, ">= 0"),
    ({"sobolev": 0.1, "target": "averaged", "sobolev_from": 0.0}, "sobolev_from"),
    ({"sobolev": 0.1, "target": "averaged", "sobolev_rows": 0}, "sobolev_rows"),
    ({"sobolev": 0.1, "target": "averaged", "dim": 17}, "at most 16"),
])
def test_sobolev_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        CFM(**{"dim": 2, "hidden": (8,), **options})


def test_cfm_without_sobolev_keeps_its_saved_options():
    assert "sobolev" not in CFM(dim=2, hidden=(8,), target="averaged").options
    assert CFM(dim=2, hidden=(8,), target="averaged", sobolev=0.05).options["sobolev"] == 0.05
