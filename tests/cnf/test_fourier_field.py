"""The Fourier-feature vector field: its features, its place in FFJORD/CFM and the CLI."""

import math

import pytest
import torch

from flowlab.cli import main
from flowlab.cnf import FourierVectorField
from flowlab.cnf.divergence import divergence_exact
from flowlab.errors import ConfigError
from flowlab.models import build_model
from flowlab.ode import SolverConfig
from flowlab.train import load_model


def test_features_are_sines_and_cosines_of_fixed_frequencies():
    field = FourierVectorField(2, hidden=(8,), features=5, scale=2.0, time_frequencies=3)
    assert field.frequencies.shape == (2, 5) and field.harmonics.shape == (3,)
    # the first layer sees [z, sin(Bz), cos(Bz), sin(k pi t), cos(k pi t)]
    assert field.layers[0].in_features == 2 + 10 + 6
    seen = {}
    field.layers[0].register_forward_hook(lambda m, args, out: seen.update(h=args[0]))
    z, t = torch.randn(4, 2), torch.tensor(0.3)
    field(t, z)
    zz = z @ field.frequencies
    k = torch.arange(1, 4) * math.pi * 0.3
    expected = torch.cat([z, zz.sin(), zz.cos(), k.sin().expand(4, 3), k.cos().expand(4, 3)], 1)
    torch.testing.assert_close(seen["h"], expected)
    # the frequencies come from the seed, with the requested scale
    wide = FourierVectorField(2, features=4000, scale=3.0, seed=1)
    assert abs(float(wide.frequencies.std()) - 3.0) < 0.1
    same = FourierVectorField(2, features=4000, scale=3.0, seed=1)
    assert torch.equal(wide.frequencies, same.frequencies)
    assert not torch.equal(wide.frequencies, FourierVectorField(2, features=4000, seed=2)
                           .frequencies)


def test_exact_divergence_equals_the_autograd_jacobian_trace():
    torch.manual_seed(0)
    field = FourierVectorField(3, hidden=(16, 16)).double()
    z, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    with torch.enable_grad():
        z_ = z.clone().requires_grad_(True)
        out = field(t, z_)
        div, _ = divergence_exact(out, z_, create_graph=False)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda x: field(t, x[None])[0], z[i])
        torch.testing.assert_close(div[i], torch.trace(jac))


def test_ffjord_with_fourier_field_round_trips_config_and_weights(tmp_path):
    from flowlab.train import save_model

    torch.manual_seed(0)
    model = build_model("cfm", dim=2, field="fourier", hidden=[16, 16], fourier_features=8,
                        fourier_scale=2.5, activation="swish",
                        eval_solver={"solver": "rk4", "steps": 8})
    config = model.config()
    assert config["field"] == "fourier" and config["fourier_scale"] == 2.5
    save_model(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    x = torch.randn(6, 2)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(model.log_prob(x), loaded.log_prob(x))
    # the mlp field's configs are unchanged (no fourier keys)
    assert "fourier_scale" not in build_model("ffjord", dim=2).config()


def test_fourier_field_density_integrates_to_one():
    torch.manual_seed(0)
    model = build_model("ffjord", dim=2, field="fourier", hidden=[16], fourier_features=8,
                        fourier_scale=1.0, activation="swish", T=1.0,
                        eval_solver=SolverConfig("rk4", steps=20)).double()
    g = torch.linspace(-6, 6, 81, dtype=torch.float64)
    grid = torch.cartesian_prod(g, g)
    model.eval()
    with torch.no_grad():
        logp = model.log_prob(grid)
        mass = float(logp.exp().sum()) * float(g[1] - g[0]) ** 2
    # a non-trivial map: the density is far from the standard normal's
    normal = -0.5 * grid.pow(2).sum(1) - math.log(2 * math.pi)
    assert float((logp - normal).abs().max()) > 0.1
    assert abs(mass - 1.0) < 1e-2, mass


def test_bad_fourier_options_are_clear():
    with pytest.raises(ConfigError, match="scale"):
        FourierVectorField(2, scale=0.0)
    with pytest.raises(ConfigError, match="positive"):
        FourierVectorField(2, features=0)
    with pytest.raises(ConfigError, match="fits|fit shape"):
        build_model("ffjord", image_shape=[1, 4, 4], field="fourier")


def test_cli_trains_cfm_with_fourier_field(tmp_path, capsys):
    run = tmp_path / "r"
    code = main(["train", "--data", "checkerboard", "--model", "cfm", "--field", "fourier",
                 "--hidden", "32,32", "--fourier-scale", "2", "--iters", "5", "--out", str(run),
                 "--no-progress", "--batch-size", "64"])
    assert code == 0
    model = load_model(run / "model.safetensors")
    assert model.config()["field"] == "fourier" and model.config()["activation"] == "swish"
    assert model.config()["fourier_scale"] == 2.0
    capsys.readouterr()
    assert main(["train", "--data", "checkerboard", "--model", "cfm", "--field", "conv",
                 "--iters", "1", "--out", str(tmp_path / "x")]) == 2
    assert "vectors take mlp or fourier" in capsys.readouterr().err
