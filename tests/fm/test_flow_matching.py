"""Flow matching: paths against their derivatives, the OT coupling against brute force, and the
flow-matching CNF against exact likelihoods."""

import itertools
import math

import pytest
import torch

from flowlab.cnf import MLPVectorField
from flowlab.errors import ConfigError
from flowlab.fm import (
    LinearPath,
    VPPath,
    independent_coupling,
    make_coupling,
    make_path,
    ot_coupling,
)
from flowlab.models import CFM, build_model
from flowlab.ode import SolverConfig
from flowlab.train import TrainConfig, train

F64 = torch.float64


@pytest.mark.parametrize("path", [LinearPath(0.0), LinearPath(0.05), VPPath()])
def test_velocity_is_the_time_derivative_of_the_path(path):
    x, z = torch.randn(50, 3, dtype=F64), torch.randn(50, 3, dtype=F64)
    t = torch.rand(50, dtype=F64) * 0.98 + 0.01
    h = 1e-6
    plus, _ = path.point_and_velocity(x, z, t + h)
    minus, _ = path.point_and_velocity(x, z, t - h)
    _, velocity = path.point_and_velocity(x, z, t)
    torch.testing.assert_close(velocity, (plus - minus) / (2 * h), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("path", [LinearPath(0.05), VPPath()])
def test_path_runs_from_data_at_0_to_noise_at_1(path):
    x, z = torch.randn(20, 2, dtype=F64), torch.randn(20, 2, dtype=F64)
    start, _ = path.point_and_velocity(x, z, torch.zeros(20, dtype=F64))
    end, _ = path.point_and_velocity(x, z, torch.ones(20, dtype=F64))
    sigma = path.sigma_min if isinstance(path, LinearPath) else 0.0
    torch.testing.assert_close(start, x + sigma * z)
    torch.testing.assert_close(end, z)


def test_ot_coupling_is_the_optimal_permutation():
    torch.manual_seed(3)
    for _ in range(5):
        x, z = torch.randn(6, 2), torch.randn(6, 2)
        _, paired = ot_coupling(x, z)
        cost = (x - paired).pow(2).sum()
        best = min((x - z[list(p)]).pow(2).sum() for p in itertools.permutations(range(6)))
        assert float(cost) == pytest.approx(float(best), rel=1e-5)
        # a permutation of the same noise, and never worse than the independent pairs
        assert sorted(paired[:, 0].tolist()) == sorted(z[:, 0].tolist())
        assert cost <= (x - independent_coupling(x, z)[1]).pow(2).sum() + 1e-6


def test_unknown_path_and_coupling():
    with pytest.raises(ConfigError, match="linear"):
        make_path("cosine")
    with pytest.raises(ConfigError, match="ot"):
        make_coupling("sinkhorn")
    with pytest.raises(ConfigError):
        LinearPath(1.5)
    with pytest.raises(ConfigError, match="T"):
        CFM(2, T=0.5)


def test_vector_field_accepts_one_time_per_row():
    torch.manual_seed(0)
    for layer in ("concat", "concatsquash", "ignore"):
        field = MLPVectorField(2, (8,), layer=layer).double()
        z, t = torch.randn(5, 2, dtype=F64), torch.rand(5, dtype=F64)
        rows = torch.stack([field(t[i], z[i : i + 1])[0] for i in range(5)])
        torch.testing.assert_close(field(t, z), rows)
    field = MLPVectorField(2, (8,), layer="concatsquash").double()
    with pytest.raises(ConfigError, match="one value per row"):
        field(torch.rand(3, dtype=F64), z)


def blobs(n, gen):
    sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    return sign * torch.tensor([1.5, 0.5]) + 0.3 * torch.randn(n, 2, generator=gen)


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_flow_matching_lowers_the_exact_nll_and_stays_normalized(coupling):
    torch.manual_seed(0)
    model = CFM(2, hidden=(32, 32), coupling=coupling,
                eval_solver=SolverConfig(atol=1e-5, rtol=1e-5))
    test = blobs(1000, torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        before = float(-model.log_prob(test).mean())
    train(model, blobs, TrainConfig(iters=300, batch_size=256, lr=5e-3), progress=False)
    model.eval()
    with torch.no_grad():
        after = float(-model.log_prob(test).mean())
        # the exact density of the trained flow still integrates to 1 on a grid
        side = torch.linspace(-5, 5, 101)
        grid = torch.cartesian_prod(side, side)
        mass = float(model.log_prob(grid).exp().sum() * (side[1] - side[0]) ** 2)
    assert after < before - 0.5, (before, after)
    assert mass == pytest.approx(1.0, abs=2e-2)


def test_cfm_config_round_trip():
    model = CFM(2, hidden=(8,), path="vp", coupling="ot")
    rebuilt = build_model("cfm", **model.config())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(4, 2)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), rebuilt.log_prob(x))
    assert rebuilt.options["path"] == "vp" and rebuilt.options["coupling"] == "ot"
    assert math.isclose(float(rebuilt.blocks[0].T), 1.0)


@pytest.mark.parametrize("solver", ["scipy", "pot"])
def test_blockwise_ot_is_optimal_within_each_block(solver):
    pytest.importorskip("ot") if solver == "pot" else None
    torch.manual_seed(4)
    coupling = make_coupling("ot", block_size=5, solver=solver)
    x, z = torch.randn(13, 2), torch.randn(13, 2)  # two whole blocks and a remainder of 3
    order = coupling.permutation(x, z)
    assert sorted(order.tolist()) == list(range(13))
    for start, stop in ((0, 5), (5, 10), (10, 13)):
        block = order[start:stop]
        assert sorted(block.tolist()) == list(range(start, stop))  # pairs stay in their block
        cost = (x[start:stop] - z[block]).pow(2).sum()
        best = min((x[start:stop] - z[start:stop][list(p)]).pow(2).sum()
                   for p in itertools.permutations(range(stop - start)))
        assert float(cost) == pytest.approx(float(best), rel=1e-5)


def test_pot_and_scipy_find_the_same_cost():
    pytest.importorskip("ot")
    torch.manual_seed(5)
    x, z = torch.randn(200, 2), torch.randn(200, 2)
    costs = []
    for solver in ("pot", "scipy"):
        paired = make_coupling("ot", block_size=None, solver=solver)(x, z)[1]
        costs.append(float((x - paired).pow(2).sum()))
    assert costs[0] == pytest.approx(costs[1], rel=1e-9)


def test_bad_ot_options_are_named():
    with pytest.raises(ConfigError, match="block size"):
        make_coupling("ot", block_size=0)
    with pytest.raises(ConfigError, match="OT solver"):
        make_coupling("ot", solver="sinkhorn")
    with pytest.raises(ConfigError, match="time_sampling"):
        CFM(2, hidden=(8,), time_sampling="beta")


def test_logit_normal_times_have_the_right_law():
    model = CFM(2, hidden=(8,), time_sampling="logit-normal")
    torch.manual_seed(0)
    t = model.sample_times(200_000, torch.zeros(1, dtype=F64))
    logit = torch.log(t) - torch.log1p(-t)
    # logit(t) ~ N(0, 1): mean 0 and variance 1 within 5 standard errors
    assert abs(float(logit.mean())) < 5 / math.sqrt(2e5)
    assert abs(float(logit.var()) - 1) < 5 * math.sqrt(2 / 2e5)
    uniform = CFM(2, hidden=(8,)).sample_times(200_000, torch.zeros(1, dtype=F64))
    assert abs(float(uniform.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 2e5)


def test_given_pairs_are_used_as_they_are():
    """With z given (rectified flow), the loss is the regression on exactly those pairs."""
    torch.manual_seed(1)
    model = CFM(2, hidden=(8,), sigma_min=0.0).double()
    x, z = torch.randn(64, 2, dtype=F64), torch.randn(64, 2, dtype=F64)
    torch.manual_seed(2)
    loss = model.training_loss(x, z).loss
    torch.manual_seed(2)
    t = model.sample_times(64, x)
    point = (1 - t[:, None]) * x + t[:, None] * z
    expected = (model.blocks[0].field(t, point) - (z - x)).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="pairs differ"):
        model.training_loss(x, z[:10])
