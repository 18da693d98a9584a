"""Tests of the FFJORD model against independent answers.

The density must integrate to one on a grid (untrained and briefly trained), with a sign check
that the wrong log-determinant would fail; Hutchinson log-densities average to the exact ones;
samples follow the density; the change of variables matches the autograd Jacobian of the flow;
adjoint gradients of the full training loss equal backprop ones. All in float64.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from flowlab.errors import ConfigError, DataError
from flowlab.models import FFJORD, MODELS, build_model, standard_normal_log_prob
from flowlab.ode import SolverConfig

F64 = torch.float64
TIGHT = SolverConfig(atol=1e-10, rtol=1e-10)




def scrambled_model(num_blocks: int, seed: int = 0, **options) -> FFJORD:
    """An untrained float64 FFJORD whose field weights are redrawn at a scale where the flow is
    far from the identity (at the default initialization log_det is ~1e-3 and a sign error in
    it would go unnoticed)."""
    torch.manual_seed(seed)
    model = FFJORD(2, hidden=(16, 16), num_blocks=num_blocks, T=1.0, **options).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("sqrt_T"):
                p.normal_(0.0, 0.5)
    return model


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """Four Gaussians (sd 0.5) at (+-1.5, +-1.5)."""
    centers = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]], dtype=F64)
    idx = torch.randint(0, 4, (n,), generator=generator)
    return centers[idx] + 0.5 * torch.randn(n, 2, dtype=F64, generator=generator)


class Grid:
    """Cell centres of a 150 x 150 grid on [-6, 6]^2 and the cell area."""

    n, half = 150, 6.0

    def __init__(self):
        width = 2 * self.half / self.n
        centres = -self.half + width * (torch.arange(self.n, dtype=F64) + 0.5)
        self.points = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1)
        self.points = self.points.reshape(-1, 2)
        self.area = width**2


def grid_masses(model: FFJORD, grid: Grid) -> tuple[float, float, torch.Tensor]:
    """(mass of the model density, mass with the log_det sign flipped, log density)."""
    with torch.no_grad():
        result = model.to_noise(grid.points)
    base = standard_normal_log_prob(result.z)
    log_p = base + result.log_det
    wrong = base - result.log_det
    return float(log_p.exp().sum()) * grid.area, float(wrong.exp().sum()) * grid.area, log_p


@pytest.fixture(scope="module")
def grid():
    return Grid()


@pytest.fixture(scope="module")
def trained():
    """An FFJORD trained for 60 Adam steps on a 2-D mixture, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = FFJORD(2, hidden=(16, 16), num_blocks=1, T=1.0, kinetic=0.01, jacobian=0.01).double()
    held_out = mixture(512, gen)
    model.eval()
    with torch.no_grad():
        nll_before = -float(model.log_prob(held_out).mean())
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        out = model.training_loss(mixture(128, gen))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        nll_after = -float(model.log_prob(held_out).mean())
    return model, nll_before, nll_after, held_out


# -- the density is normalized ----------------------------------------------------------------


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_untrained_density_integrates_to_one(grid, num_blocks):
    # Default initialization: close to the identity map, so this mostly checks plumbing.
    torch.manual_seed(0)
    plain = FFJORD(2, hidden=(16, 16), num_blocks=num_blocks).double().eval()
    mass, _, _ = grid_masses(plain, grid)
    assert abs(mass - 1.0) < 1e-2, mass
    # Scrambled weights: far from the identity.
    model = scrambled_model(num_blocks).eval()
    mass, wrong_mass, log_p = grid_masses(model, grid)
    assert abs(mass - 1.0) < 1e-2, mass
    # The test has teeth: with the log-determinant's sign flipped the mass is far from 1.
    assert abs(wrong_mass - 1.0) > 0.1, wrong_mass
    # log_prob is what was integrated (on a few grid points, same solver: to its tolerance).
    some = grid.points[::997]
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(some), log_p[::997], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained_on_grid(grid, trained):
    return grid_masses(trained[0], grid)


def test_trained_density_integrates_to_one(trained, trained_on_grid):
    _, nll_before, nll_after, _ = trained
    assert nll_after < nll_before - 0.5  # training did something
    mass, wrong_mass, _ = trained_on_grid
    assert abs(mass - 1.0) < 1e-2, mass
    assert abs(wrong_mass - 1.0) > 0.1, wrong_mass


def test_samples_follow_the_density(grid, trained, trained_on_grid):
    # Moments of samples (noise -> data) against moments of the density (data -> noise) on
    # the grid: checks that sampling and log_prob run the same flow in opposite directions.
    model, *_ = trained
    _, _, log_p = trained_on_grid
    p = log_p.exp() * grid.area
    x = grid.points
    torch.manual_seed(1)
    samples = model.sample((4000,))

    def features(pts):
        return torch.stack(
            [pts[:, 0], pts[:, 1], pts[:, 0] ** 2, pts[:, 1] ** 2, pts[:, 0] * pts[:, 1]], 1
        )

    expected = (features(x) * p[:, None]).sum(0)
    f = features(samples)
    mean, se = f.mean(0), f.std(0) / math.sqrt(len(f))
    assert ((mean - expected).abs() < 4 * se).all(), (mean, expected, se)
    # Sanity that the comparison can fail: the standard normal's moments are far away.
    normal = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0], dtype=F64)
    assert ((normal - expected).abs() > 8 * se).any()


# -- Hutchinson against exact ---------------------------------------------------------------


@pytest.mark.parametrize("probe,n", [("rademacher", 2000), ("gaussian", 8000)])
def test_hutchinson_log_prob_averages_to_exact(trained, probe, n):
    # Gaussian probes have a much larger variance here (the Jacobian is diagonal-heavy), hence
    # more of them. Points where |log_det| is not small, so that a relative bias shows.
    model, *_ = trained
    x = torch.tensor([[1.5, 1.5], [0.0, 3.0], [0.7, 0.7], [2.0, 0.0]], dtype=F64)
    model.options["probe"] = probe
    try:
        with torch.no_grad():
            exact = model.log_prob(x)
            result = model.to_noise(x, divergence="exact")
            estimates = model.log_prob(
                x.repeat(n, 1), divergence="hutchinson", generator=torch.Generator().manual_seed(2)
            ).reshape(n, len(x))
    finally:
        model.options["probe"] = "rademacher"
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(n)
    assert (estimates.std(0) > 0).all()  # really estimated
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # The bound is tight relative to the log-determinant it estimates: a 10% bias would fail.
    assert (4 * se < 0.1 * result.log_det.abs()).all(), (se, result.log_det)


def test_eval_mode_is_deterministic_train_mode_follows_training_divergence():
    model = scrambled_model(1, seed=3, divergence="hutchinson")
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        a, b = model.log_prob(x), model.log_prob(x)
        exact = model.log_prob(x, divergence="exact")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, exact, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        c = model.log_prob(x, generator=torch.Generator().manual_seed(4))
        d = model.log_prob(x, generator=torch.Generator().manual_seed(4))
        e = model.log_prob(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert (c - e).abs().max() > 1e-6


# -- change of variables against autograd -------------------------------------------------------


def test_log_prob_matches_autograd_change_of_variables():
    model = scrambled_model(2, seed=6).eval()
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(6))

    def to_noise_map(points):  # the flow of z alone, block by block (no divergence channel)
        z = points
        for block in model.blocks:
            z = block.trajectory(z, torch.tensor([0.0, 1.0]), solver=TIGHT)[0][-1]
        return z

    full = torch.autograd.functional.jacobian(to_noise_map, x)
    idx = torch.arange(3)
    _, logabsdet = torch.linalg.slogdet(full[idx, :, idx, :])
    expected = standard_normal_log_prob(to_noise_map(x)) + logabsdet
    with torch.no_grad():
        got = model.log_prob(x, solver=TIGHT)
    assert logabsdet.abs().max() > 0.1
    torch.testing.assert_close(got, expected.detach(), rtol=1e-7, atol=1e-7)


# -- maps, sampling, trajectories ---------------------------------------------------------------


def test_sample_and_rsample():
    model = scrambled_model(2, seed=7).eval()
    model.eval_solver = SolverConfig(atol=1e-5, rtol=1e-5)
    assert model.sample((5,)).shape == (5, 2)
    assert model.sample((2, 3)).shape == (2, 3, 2)
    assert model.sample().shape == (2,)
    assert model.sample((0,)).shape == (0, 2)
    assert model.sample((3, 0)).shape == (3, 0, 2)
    with torch.no_grad():
        assert model.log_prob(torch.zeros(0, 2, dtype=F64)).shape == (0,)
    s = model.sample((4,))
    assert s.dtype == F64 and not s.requires_grad and torch.isfinite(s).all()
    r = model.rsample((6,))
    assert r.shape == (6, 2) and r.requires_grad
    r.pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.endswith("sqrt_T") or name.endswith("linear.weight"):
            assert p.grad.abs().max() > 0, name
    # sample() is rsample() without the graph: same base draws give the same points.
    torch.manual_seed(8)
    a = model.sample((3,))
    torch.manual_seed(8)
    b = model.rsample((3,)).detach()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and they are the noise -> data map of standard normal draws.
    torch.manual_seed(8)
    z = torch.randn(3, 2, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(model.to_data(z), a, rtol=0, atol=0)


@pytest.mark.parametrize("solver,tol", [(None, 1e-4), (TIGHT, 1e-7)], ids=["eval", "tight"])
def test_to_data_inverts_to_noise(trained, solver, tol):
    # With the eval solver (1e-6) the round trip is good to ~2e-5 where the flow contracts
    # strongly (log_det ~ -8 near the origin); with a tight solver to ~1e-8.
    model, *_, held_out = trained
    x = held_out[:64]
    with torch.no_grad():
        z = model.to_noise(x, solver=solver).z
        back = model.to_data(z, solver=solver)
        again = model.to_noise(back, solver=solver).z
    assert (z - x).abs().max() > 0.3
    torch.testing.assert_close(back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(again, z, rtol=tol, atol=tol)


def test_two_block_round_trip_runs_blocks_in_reverse_order():
    model = scrambled_model(2, seed=14).eval()
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        out = model.to_noise(x, solver=TIGHT)
        back = model.to_data(out.z, solver=TIGHT)
        # Block by block by hand: 0 then 1 forward, 1 then 0 backward.
        z = model.blocks[1](model.blocks[0](x, solver=TIGHT).z, solver=TIGHT).z
    torch.testing.assert_close(out.z, z, rtol=1e-8, atol=1e-8)
    assert (out.z - x).abs().max() > 0.3
    torch.testing.assert_close(back, x, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("to_data", [True, False])
def test_trajectory_shape_and_endpoints(to_data):
    model = scrambled_model(2, seed=9).eval()
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        frames = model.trajectory(x, steps_per_block=4, to_data=to_data, solver=TIGHT)
        end = model.to_data(x, solver=TIGHT) if to_data else model.to_noise(x, solver=TIGHT).z
        # Where the first block the points go through hands over to the second.
        first = model.blocks[1] if to_data else model.blocks[0]
        handover = first(x, reverse=to_data, solver=TIGHT).z
    assert frames.shape == (1 + 2 * 4, 5, 2)
    assert torch.equal(frames[0], x)
    torch.testing.assert_close(frames[4], handover, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(frames[-1], end, rtol=1e-8, atol=1e-8)
    assert (frames[-1] - frames[0]).abs().max() > 0.1


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_training_gradient_equals_backprop(divergence):
    model = scrambled_model(2, seed=10, kinetic=0.1, jacobian=0.05, divergence=divergence)
    with torch.no_grad():
        for block in model.blocks:
            block.sqrt_T.fill_(0.75)  # T = 0.5625 per block
    model.train()
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(10))
    runs = {}
    for gradient in ("backprop", "adjoint"):
        model.solver = SolverConfig(atol=1e-11, rtol=1e-11, gradient=gradient)
        torch.manual_seed(11)  # the same Hutchinson probes for both
        out = model.training_loss(x)
        assert set(out.metrics) >= {"nll", "kinetic", "jacobian", "nfe_forward", "T"}
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        runs[gradient] = (out, grads)
    (out_b, grads_b), (out_a, grads_a) = runs["backprop"], runs["adjoint"]
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    assert all(s.nfe_backward > 0 for s in out_a.stats)
    assert all(s.nfe_backward == 0 for s in out_b.stats)
    for (name, _), a, b in zip(model.named_parameters(), grads_a, grads_b, strict=True):
        if name.endswith("sqrt_T"):
            # Backprop's gradient in T is the derivative of dopri5's dense output: O(h^4).
            assert b.abs() > 1e-2
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8, msg=name)
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)


def test_training_loss_is_nll_plus_weighted_regularizers():
    model = scrambled_model(1, seed=12, kinetic=0.3, jacobian=0.2)
    model.solver = TIGHT
    model.train()
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(12))
    out = model.training_loss(x)
    block = model.blocks[0]
    ref = block(x, solver=TIGHT, kinetic=True, jacobian=True)
    nll = -(standard_normal_log_prob(ref.z) + ref.log_det).mean()
    expected = nll + 0.3 * ref.regularizers["kinetic"].mean() + 0.2 * ref.regularizers[
        "jacobian"].mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)
    assert out.metrics["nll"] == pytest.approx(float(nll.detach()), rel=1e-12)
    assert out.metrics["T"] == pytest.approx(1.0)
    assert out.metrics["nfe_forward"] == out.stats[0].nfe_forward > 0


# -- validation and configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([[0.0, float("nan")], [1.0, 2.0]], dtype=F64),
        torch.tensor([[0.0, float("inf")]], dtype=F64),
        torch.zeros(4, 3, dtype=F64),
        torch.zeros(2, dtype=F64),
        torch.zeros(4, 2, 1, dtype=F64),
        torch.zeros(4, 2, dtype=torch.int64),
        [[0.0, 1.0]],
    ],
    ids=["nan", "inf", "wrong-dim", "1d", "3d", "integer", "list"],
)
def test_check_input_rejects_bad_data(bad):
    model = scrambled_model(1)
    for call in (model.log_prob, model.to_noise, model.training_loss, model.check_input):
        with pytest.raises(DataError):
            call(bad)


def test_config_round_trip():
    model = FFJORD(
        2, hidden=(8, 8), layer="concat", activation="softplus", num_blocks=2, T=0.7,
        divergence="hutchinson", probe="gaussian", solver={"solver": "bosh3", "atol": 1e-4},
        eval_solver=SolverConfig(atol=1e-7, rtol=1e-7), kinetic=0.1, jacobian=0.2,
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = json.loads(json.dumps(model.config()))  # JSON-serializable, no pickles
    # Every constructor option is in the config (T and train_T included); the image and
    # Fourier-field options only when used, so that configs of models written before them
    # stay equal.
    options = set(inspect.signature(FFJORD.__init__).parameters) - {"self"}
    assert options - {"image_shape", "field", "fourier_features", "fourier_scale"} == set(config)
    image = FFJORD(image_shape=(1, 4, 4), field="conv", hidden=(4,))
    fourier = {"fourier_features", "fourier_scale"}
    assert set(image.config()) == options - fourier and image.config()["image_shape"] == [1, 4, 4]
    vector = FFJORD(2, field="fourier", hidden=(4,), fourier_scale=2.0)
    assert set(vector.config()) == options - {"image_shape"}
    assert vector.config()["fourier_scale"] == 2.0
    assert build_model("ffjord", **json.loads(json.dumps(image.config()))).config() == \
        image.config()
    assert config["T"] == 0.7 and config["hidden"] == [8, 8] and config["num_blocks"] == 2
    rebuilt = build_model("ffjord", **config).double()
    assert type(rebuilt) is FFJORD and MODELS["ffjord"] is FFJORD
    assert rebuilt.config() == config
    assert rebuilt.solver == model.solver and rebuilt.eval_solver == model.eval_solver
    x = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(13))
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        before = rebuilt.log_prob(x)
        rebuilt.load_state_dict(model.state_dict())
        torch.testing.assert_close(rebuilt.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    assert (before - model.log_prob(x).detach()).abs().max() > 1e-3  # the weights mattered


@pytest.mark.parametrize(
    "options",
    [
        {"num_blocks": 0},
        {"divergence": "approximate"},
        {"eval_divergence": "approximate"},
        {"probe": "uniform"},
        {"kinetic": -0.1},
        {"jacobian": -0.1},
        {"solver": {"solver": "dopri5", "tolerance": 1e-5}},
        {"solver": {"solver": "rk4"}},
        {"eval_solver": {"atol": -1.0}},
        {"layer": "gated"},
        {"T": 0.0},
    ],
)
def test_invalid_model_options(options):
    with pytest.raises(ConfigError):
        FFJORD(2, hidden=(4,), **options)


def test_unknown_model_and_options():
    with pytest.raises(ConfigError):
        build_model("not-a-model")
    model = scrambled_model(1)
    with pytest.raises(ConfigError):
        model.to_noise(torch.zeros(2, 2, dtype=F64), probes=3)


def test_trajectory_at_chosen_fractions_matches_direct_solves():
    torch.manual_seed(0)
    model = FFJORD(2, hidden=(8,), num_blocks=2).double().eval()
    z = torch.randn(5, 2, dtype=torch.float64)
    frames = model.trajectory(z, fractions=[0.0, 0.25, 1.0])
    assert frames.shape == (5, 5, 2)
    # frame 1: a quarter of the way through the last block, entered at its T
    last = model.blocks[-1]
    quarter, _ = last.trajectory(z, torch.tensor([1.0, 0.75]), solver=model.eval_solver)
    torch.testing.assert_close(frames[1], quarter[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frames[-1], model.to_data(z), atol=1e-5, rtol=1e-5)
    for bad in ([0.5, 1.0], [0.0, 0.7, 0.6, 1.0], [0.0]):
        with pytest.raises(ConfigError):
            model.trajectory(z, fractions=bad)


def test_sample_and_log_prob_agrees_with_log_prob_of_the_samples():
    torch.manual_seed(1)
    model = FFJORD(2, hidden=(16, 16), num_blocks=2).double().eval()
    with torch.no_grad():  # a non-trivial flow: larger weights than the default init
        for p in model.parameters():
            p.mul_(3.0)
    x, log_q = model.sample_and_log_prob((7,))
    assert x.shape == (7, 2) and log_q.shape == (7,)
    with torch.no_grad():
        direct = model.log_prob(x)
    torch.testing.assert_close(log_q, direct, atol=1e-4, rtol=1e-4)
    assert (log_q - direct).abs().max() < 1e-4 < (log_q - model.log_prob(x + 0.1)).abs().max()


@pytest.mark.parametrize("field", ["conv", "unet"])
def test_image_cnf_round_trip_and_exact_versus_hutchinson(field):
    """A CNF on (1, 4, 4) images: data -> noise -> data returns the data, and the exact
    log-density (one backward pass per pixel) equals the mean of Hutchinson estimates over
    many probes (two-sided, within 4 s.e.)."""
    from flowlab.transforms.base import randomize_

    torch.manual_seed(0)
    hidden = (8, 8) if field == "conv" else (4, 8)
    model = FFJORD(image_shape=(1, 4, 4), field=field, hidden=hidden, T=0.5,
                   eval_solver=SolverConfig("rk4", steps=4)).double()
    randomize_(model, std=0.05)
    model.eval()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    tight = SolverConfig("rk4", steps=64)  # rk4 is not exactly reversible: many small steps
    with torch.no_grad():
        z = model.to_noise(x, solver=tight).z
        torch.testing.assert_close(model.to_data(z, solver=tight), x, atol=1e-5, rtol=1e-5)
        exact = model.log_prob(x)
        gen = torch.Generator().manual_seed(1)
        # 300 copies of the 3 images in one batch: each row gets its own probe
        estimates = model.log_prob(x.repeat(300, 1, 1, 1), divergence="hutchinson",
                                   generator=gen).reshape(300, 3)
    mean, se = estimates.mean(0), estimates.std(0) / 300 ** 0.5
    assert ((mean - exact).abs() < 4 * se + 1e-9).all(), (mean, exact, se)
    assert (estimates.std(0) > 0).all()  # the estimator is noisy, so the check has teeth
    assert model.sample((2,)).shape == (2, 1, 4, 4)


def test_cfm_trains_a_unet_field_on_images():
    from flowlab.models import CFM

    torch.manual_seed(0)
    model = CFM(image_shape=(1, 4, 4), field="unet", hidden=(4, 8))
    x = torch.rand(16, 1, 4, 4)
    out = model.training_loss(x)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert out.loss > 0 and out.metrics["nfe_forward"] == 0.0


def test_image_cnf_options_are_checked():
    with pytest.raises(ConfigError, match="does not fit"):
        FFJORD(2, field="conv")
    with pytest.raises(ConfigError, match="does not fit"):
        FFJORD(image_shape=(1, 4, 4), field="mlp")
    with pytest.raises(ConfigError, match="not both"):
        FFJORD(2, image_shape=(1, 4, 4), field="conv")
    with pytest.raises(ConfigError, match="multiples"):
        FFJORD(image_shape=(1, 4, 4), field="unet", hidden=(8, 12))
