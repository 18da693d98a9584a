"""Tests of FFJORD's multiscale CNF (``ffjord-multiscale``) against independent answers.

In float64 on tiny images: the log-density equals ``log N(z) + log|det dz/dx|`` with the
Jacobian taken by autograd (``torch.autograd.functional.jacobian``: the ODE solver's autograd
function does not support ``torch.func`` transforms) of a reference data -> noise map written
here from the documented structure (blocks, squeeze, blocks, factor-out); the noise -> data
map inverts it; the sampling solve's log-density agrees with a fresh data -> noise one;
Hutchinson log-densities are reproducible from a generator and average to the exact ones.
"""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from flowlab.errors import ConfigError, DataError
from flowlab.models import MODELS, MultiscaleFFJORD, build_model, standard_normal_log_prob
from flowlab.ode import SolverConfig
from flowlab.transforms.reshape import Squeeze

F64 = torch.float64
TIGHT = SolverConfig(atol=1e-9, rtol=1e-9)
CHEAP = SolverConfig(solver="rk4", steps=2)  # fixed grid: for plumbing, not accuracy


def scrambled(image_shape=(1, 4, 4), scales=2, blocks_per_scale=1, seed=0, scale=0.3,
              **options) -> MultiscaleFFJORD:
    """An untrained float64 model whose weights are redrawn so that the flow is far from the
    identity (at the default initialization a wrong log-determinant could hide in ~1e-3)."""
    torch.manual_seed(seed)
    options.setdefault("hidden", (4,))
    model = MultiscaleFFJORD(image_shape, scales=scales, blocks_per_scale=blocks_per_scale,
                             T=1.0, **options).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("sqrt_T"):
                p.normal_(0.0, scale)
    return model


def images(n: int, shape=(1, 4, 4), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def reference_to_noise(model: MultiscaleFFJORD, x: torch.Tensor, scales: int,
                       blocks_per_scale: int) -> torch.Tensor:
    """The data -> noise map from the documented structure, block by block with plain solves
    (no divergence): at each scale ``blocks_per_scale`` blocks; except at the last, squeeze,
    as many blocks again, and factor out the last half of the channels. The noise puts the
    factored-out channels back where they left (undoing the squeezes)."""
    squeeze, blocks, factored = Squeeze(), iter(model.blocks), []

    def solve(h):
        return next(blocks).trajectory(h, torch.tensor([0.0, 1.0]), solver=TIGHT)[0][-1]

    h = x
    for scale in range(scales):
        for _ in range(blocks_per_scale):
            h = solve(h)
        if scale < scales - 1:
            h = squeeze(h)[0]
            for _ in range(blocks_per_scale):
                h = solve(h)
            half = h.shape[1] // 2
            h, out = h[:, :half], h[:, half:]
            factored.append(out)
    assert next(blocks, None) is None  # every block used once
    for out in reversed(factored):
        h = squeeze.inverse(torch.cat([h, out], dim=1))[0]
    return h


# -- change of variables against autograd -----------------------------------------------------


def test_log_prob_matches_autograd_jacobian():
    model = scrambled(seed=1).eval()
    x = images(1, seed=1)
    with torch.no_grad():
        result = model.to_noise(x, solver=TIGHT, divergence="exact")
        got = model.log_prob(x, solver=TIGHT, divergence="exact")
    for i in range(len(x)):
        def flat_map(image):
            return reference_to_noise(model, image[None], 2, 1).flatten()

        jac = torch.autograd.functional.jacobian(flat_map, x[i].clone()).reshape(16, 16)
        _, logabsdet = torch.linalg.slogdet(jac)
        z_ref = reference_to_noise(model, x[i:i + 1], 2, 1).detach()
        # The noise has the image's layout and is the reference map's output, value by value.
        torch.testing.assert_close(result.z[i:i + 1], z_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(result.log_det[i], logabsdet.detach(), rtol=1e-6, atol=1e-6)
        expected = standard_normal_log_prob(z_ref)[0] + logabsdet.detach()
        torch.testing.assert_close(got[i], expected, rtol=1e-6, atol=1e-6)
        assert abs(float(logabsdet)) > 0.1  # far from the identity: a sign error would show


def test_identity_blocks_leave_the_image_in_place():
    # With zero vector fields only the squeezes and factor-outs act; the noise layout puts
    # every number back where it came from, so the map is the identity, with log|det| = 0.
    model = MultiscaleFFJORD((2, 8, 8), scales=3, blocks_per_scale=1, hidden=(4,)).double()
    with torch.no_grad():
        for block in model.blocks:
            for p in block.field.parameters():
                p.zero_()
    model.eval()
    x = images(3, (2, 8, 8), seed=2)
    result = model.to_noise(x, solver=CHEAP)
    torch.testing.assert_close(result.z, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(result.log_det, torch.zeros(3, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(model.to_data(x, solver=CHEAP), x, rtol=0, atol=1e-14)


def test_round_trip_and_sampling_log_density():
    model = scrambled(seed=3).eval()
    solver = SolverConfig(atol=1e-8, rtol=1e-8)
    x = images(3, seed=3)
    with torch.no_grad():
        z = model.to_noise(x, solver=solver, divergence="exact").z
        back, stats = model.to_data_with_stats(z, solver=solver)
    assert (z - x).abs().max() > 0.1  # really mapped
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)
    assert len(stats) == len(model.blocks) == 3 and all(s.nfe_forward > 0 for s in stats)
    # The log-density integrated along the sampling solve equals a fresh data -> noise one.
    model.options["eval_divergence"] = "exact"
    model.eval_solver = solver
    torch.manual_seed(4)
    samples, log_q = model.sample_and_log_prob((3,))
    with torch.no_grad():
        log_p = model.log_prob(samples)
    assert samples.shape == (3, 1, 4, 4)
    torch.testing.assert_close(log_q, log_p, rtol=1e-6, atol=1e-6)


# -- shapes --------------------------------------------------------------------------------------


def test_shapes_along_the_flow():
    model = MultiscaleFFJORD((3, 8, 8), scales=3, blocks_per_scale=2, hidden=(4, 4),
                             strides=(1, 2, -2))
    assert model.event_shape == (3, 8, 8)
    assert model.scale_shapes == ((3, 8, 8), (6, 4, 4), (12, 2, 2))
    assert model.block_shapes == ((3, 8, 8),) * 2 + ((12, 4, 4),) * 2 + ((6, 4, 4),) * 2 + \
        ((24, 2, 2),) * 2 + ((12, 2, 2),) * 2
    assert len(model.blocks) == 2 * (2 * 3 - 1)
    one = MultiscaleFFJORD((1, 4, 4), scales=1, blocks_per_scale=1, hidden=(4,))
    assert one.block_shapes == ((1, 4, 4),) and one.scale_shapes == ((1, 4, 4),)
    model.eval()
    model.eval_solver = CHEAP
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        log_p, stats = model.log_prob_with_stats(x, generator=torch.Generator().manual_seed(0))
        assert model.to_noise(x).z.shape == (2, 3, 8, 8)
        assert model.sample((2, 3)).shape == (2, 3, 3, 8, 8)
        assert model.sample().shape == (3, 8, 8)
    assert log_p.shape == (2,) and log_p.dtype == torch.float32 and len(stats) == 10
    r = model.rsample((2,))
    assert r.shape == (2, 3, 8, 8) and r.requires_grad


@pytest.mark.parametrize(
    "shape,options,match",
    [
        ((1, 6, 6), {"scales": 3},
         r"divisible by 4; 6x6 is not: use at most 2 scales.*\(--scales 2\)"),
        ((1, 5, 8), {"scales": 2},
         r"squeeze the image once.*divisible by 2.*at most 1 scale .*\(--scales 1\)"),
        ((1, 8, 8), {"scales": 0}, "scales must be"),
        ((1, 8, 8), {"blocks_per_scale": 0}, "blocks_per_scale must be"),
        ((64,), {}, r"image_shape must be positive \(C, H, W\)"),
        ((1, 4, 4), {"strides": (2, 2)}, r"scale 0 \(blocks on 1x4x4\)"),
        ((1, 4, 4), {"strides": (1, 2, -2, 1)}, "one stride per convolution"),
        ((1, 4, 4), {"divergence": "approximate"}, "unknown divergence"),
        ((1, 4, 4), {"eval_divergence": "approximate"}, "unknown eval_divergence"),
        ((1, 4, 4), {"probe": "uniform"}, "unknown probe"),
        ((1, 4, 4), {"kinetic": -1.0}, "regularizer weights"),
        ((1, 4, 4), {"activation": "relu6"}, "unknown activation"),
    ],
)
def test_bad_shapes_and_options_are_clear_errors(shape, options, match):
    options = {"hidden": (4,), **options}
    with pytest.raises(ConfigError, match=match):
        MultiscaleFFJORD(shape, **options)


def test_bad_inputs_are_clear_errors():
    model = MultiscaleFFJORD((1, 4, 4), hidden=(4,))
    with pytest.raises(DataError, match=r"\(batch, 1, 4, 4\)"):
        model.log_prob(torch.zeros(2, 16))
    with pytest.raises(DataError, match=r"\(batch, 1, 4, 4\)"):
        model.to_data(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="unknown options"):
        model.to_noise(torch.zeros(2, 1, 4, 4), probes=3)


# -- configuration ---------------------------------------------------------------------------------


def test_config_round_trip_gives_identical_log_prob():
    model = scrambled((1, 4, 4), scales=2, blocks_per_scale=1, seed=5, hidden=(4, 4),
                      strides=(1, 2, -2), activation="tanh", kinetic=0.1,
                      solver={"solver": "bosh3", "atol": 1e-4}, eval_solver=CHEAP)
    config = json.loads(json.dumps(model.config()))  # JSON-serializable, no pickles
    options = set(inspect.signature(MultiscaleFFJORD.__init__).parameters) - {"self"}
    assert set(config) == options
    assert config["strides"] == [1, 2, -2] and config["image_shape"] == [1, 4, 4]
    rebuilt = build_model("ffjord-multiscale", **config).double()
    assert type(rebuilt) is MultiscaleFFJORD and MODELS["ffjord-multiscale"] is MultiscaleFFJORD
    assert rebuilt.config() == config
    assert rebuilt.solver == model.solver and rebuilt.eval_solver == model.eval_solver
    x = images(3, seed=5)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        before = rebuilt.log_prob(x, divergence="exact")
        rebuilt.load_state_dict(model.state_dict())
        for divergence in ("exact", "hutchinson"):
            a = rebuilt.log_prob(x, divergence=divergence,
                                 generator=torch.Generator().manual_seed(1))
            b = model.log_prob(x, divergence=divergence,
                               generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (before - model.log_prob(x, divergence="exact")).abs().max() > 1e-3


def test_defaults_are_hutchinson_in_training_and_evaluation():
    model = MultiscaleFFJORD((1, 4, 4), hidden=(4,))
    assert model.options["divergence"] == model.options["eval_divergence"] == "hutchinson"
    assert model.eval_solver == SolverConfig(atol=1e-5, rtol=1e-5)


# -- Hutchinson against exact -------------------------------------------------------------------


def test_hutchinson_is_reproducible_and_averages_to_exact():
    # On a fixed grid the path of z does not depend on the probe, so the estimated log_det is
    # an unbiased estimate of the exact-divergence solve on the same grid (an adaptive solver
    # would let the probe move the steps, a bias within its tolerance).
    model = scrambled(seed=6, scale=0.5).eval()
    model.eval_solver = SolverConfig(solver="rk4", steps=3)
    x = images(2, seed=6)
    n = 2500
    with torch.no_grad():
        exact = model.to_noise(x, divergence="exact")
        exact_log_p = standard_normal_log_prob(exact.z) + exact.log_det

        def estimate(seed, copies=1):
            return model.log_prob(x.repeat(copies, 1, 1, 1),
                                  generator=torch.Generator().manual_seed(seed))

        torch.testing.assert_close(estimate(7), estimate(7), rtol=0, atol=0)
        assert (estimate(7) - estimate(8)).abs().max() > 1e-6
        estimates = estimate(9, n).reshape(n, len(x))
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(n)
    assert (estimates.std(0) > 0).all()  # really estimated
    assert ((mean - exact_log_p).abs() < 4 * se).all(), (mean, exact_log_p, se)
    # The bound is tight relative to the log-determinant it estimates: a 25% bias would fail.
    assert (4 * se < 0.25 * exact.log_det.abs()).all(), (se, exact.log_det)


# -- training --------------------------------------------------------------------------------------


def test_training_loss_metrics_and_gradients():
    model = scrambled(seed=8, kinetic=0.1, jacobian=0.05)
    model.solver = SolverConfig(atol=1e-6, rtol=1e-6)
    model.train()
    x = images(4, seed=8)
    torch.manual_seed(9)  # the probes of the loss and of log_prob are the same
    out = model.training_loss(x)
    torch.manual_seed(9)
    with torch.no_grad():
        log_p = model.log_prob(x)
    assert set(out.metrics) == {"nll", "kinetic", "jacobian", "nfe_forward", "T"}
    # (equal up to the solver tolerance: the regularizer channels change the adaptive steps)
    assert out.metrics["nll"] == pytest.approx(-float(log_p.mean()), rel=1e-6)
    assert out.metrics["kinetic"] > 0 and out.metrics["jacobian"] > 0
    expected = out.metrics["nll"] + 0.1 * out.metrics["kinetic"] + 0.05 * out.metrics["jacobian"]
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-9)
    assert out.metrics["T"] == pytest.approx(3.0) and len(out.stats) == 3
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(float(b.sqrt_T.grad.abs()) > 0 for b in model.blocks)
    plain = scrambled(seed=8)
    assert set(plain.training_loss(x).metrics) == {"nll", "nfe_forward", "T"}


# -- pictures ----------------------------------------------------------------------------------


def test_flow_frames_in_image_layout_there_and_back():
    model = scrambled(seed=11).eval()
    solver = SolverConfig(atol=1e-8, rtol=1e-8)
    x = images(2, seed=11)
    k = 2
    states, velocities, times = model.flow_frames(x, k, to_data=False, solver=solver)
    assert states.shape == velocities.shape == (1 + k * 3, 2, 1, 4, 4) and len(times) == 7
    torch.testing.assert_close(states[0], x, rtol=0, atol=0)
    with torch.no_grad():
        z = model.to_noise(x, solver=solver, divergence="exact").z
    torch.testing.assert_close(states[-1], z, rtol=1e-6, atol=1e-6)  # the noise, as to_noise
    T = [float(b.T.detach()) for b in model.blocks]
    assert [(b, round(t, 9)) for b, t, _ in times] == [
        (0, 0.0), (0, round(T[0] / 2, 9)), (0, round(T[0], 9)), (1, round(T[1] / 2, 9)),
        (1, round(T[1], 9)), (2, round(T[2] / 2, 9)), (2, round(T[2], 9))]
    # Before the factor-out every number moves; after it, the 8 factored-out ones are frozen.
    assert (velocities[:5] != 0).all() and int((velocities[5:] == 0).sum()) == 2 * 2 * 8
    back, back_v, back_times = model.flow_frames(states[-1], k, to_data=True, solver=solver)
    torch.testing.assert_close(back[-1], x, rtol=1e-6, atol=1e-6)
    assert [b for b, _, _ in back_times] == [2, 2, 2, 1, 1, 0, 0]
    # The same states visited in the other order, moving the other way.
    torch.testing.assert_close(back.flip(0), states, rtol=1e-6, atol=1e-6)
    # (the frames between two blocks carry the velocity of the block just left, so they differ)
    same = [0, 1, 3, 5, 6]
    torch.testing.assert_close(back_v.flip(0)[same], -velocities[same], rtol=1e-5, atol=1e-5)


# -- command line ---------------------------------------------------------------------------------


def test_cli_builds_the_model_from_its_flags():
    from flowlab import cli

    parser = cli.build_parser()
    args = parser.parse_args(["train", "--data", "digits", "--model", "ffjord-multiscale",
                              "--scales", "3", "--num-blocks", "1", "--hidden", "8,8"])
    options = cli._model_options(args, (1, 8, 8))
    assert options["scales"] == 3 and options["blocks_per_scale"] == 1
    assert options["activation"] == "softplus" and options["divergence"] == "hutchinson"
    model = build_model("ffjord-multiscale", **options)
    assert model.scale_shapes == ((1, 8, 8), (2, 4, 4), (4, 2, 2))
    default = cli._model_options(parser.parse_args(
        ["train", "--data", "digits", "--model", "ffjord-multiscale"]), (1, 8, 8))
    assert default["scales"] == 2 and default["blocks_per_scale"] == 2
    assert default["hidden"] == [64, 64, 64]
    with pytest.raises(ConfigError, match="--scales applies to ffjord-multiscale"):
        cli._model_options(parser.parse_args(["train", "--scales", "2"]), (2,))
    with pytest.raises(ConfigError, match="models images"):
        cli._model_options(parser.parse_args(["train", "--model", "ffjord-multiscale"]), (2,))
    with pytest.raises(ConfigError, match="drop --field"):
        cli._model_options(parser.parse_args(
            ["train", "--model", "ffjord-multiscale", "--field", "unet"]), (1, 8, 8))
    with pytest.raises(ConfigError, match="divisible by 16"):
        build_model("ffjord-multiscale", **cli._model_options(parser.parse_args(
            ["train", "--model", "ffjord-multiscale", "--scales", "5"]), (1, 8, 8)))


def test_cli_trains_and_initializes_from_a_multiscale_run(tmp_path, capsys):
    """A tiny digits run end to end; --init takes its architecture (scales included)."""
    from flowlab.cli import main
    from flowlab.train import load_model

    tiny = ["--data", "digits", "--model", "ffjord-multiscale", "--iters", "1",
            "--batch-size", "8", "--hidden", "4", "--num-blocks", "1", "--no-progress",
            "--solver", "rk4", "--steps", "2"]
    pre, tuned = tmp_path / "pre", tmp_path / "tuned"
    assert main(["train", *tiny, "--scales", "3", "--out", str(pre)]) == 0
    assert main(["train", *tiny, "--scales", "2", "--lr", "1e-12", "--fixed-T",
                 "--init", str(pre), "--out", str(tuned)]) == 0
    assert "starting from the weights of" in capsys.readouterr().out
    a, b = load_model(pre / "model.safetensors"), load_model(tuned / "model.safetensors")
    assert a.name == b.name == "ffjord-multiscale"
    assert b.options["scales"] == 3 and b.scale_shapes == ((1, 8, 8), (2, 4, 4), (4, 2, 2))
    x = torch.randn(3, 1, 8, 8)
    a.eval()
    b.eval()
    with torch.no_grad():
        la = a.log_prob(x, solver=CHEAP, generator=torch.Generator().manual_seed(0))
        lb = b.log_prob(x, solver=CHEAP, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
