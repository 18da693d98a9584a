"""Image flow pictures: the GIF of test digits carried to noise and integrated back (frames,
size, a round trip that really reconstructs, field panels that point along the motion), slerp
against its closed form, interpolation grids whose ends decode to the two images, for CNFs and
a multiscale discrete flow, and the clear error for a model without a vector field."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from flowlab.cli import main
from flowlab.errors import ConfigError
from flowlab.models import FFJORD, build_model
from flowlab.viz import (
    animate_images,
    choose_pairs,
    flow_frames,
    has_vector_field,
    interpolate_images,
    slerp,
)

pytest.importorskip("sklearn")  # the digits ship with scikit-learn

SOLVER_TOL = 1e-5


@pytest.fixture(scope="module")
def tasks():
    from flowlab.data.image_task import ImageTask

    return {layout: ImageTask("digits", layout=layout) for layout in ("flat", "image")}


@pytest.fixture(scope="module")
def test_images(tasks):
    return tasks["flat"].test_split().images


def tiny_cnf(layout: str) -> FFJORD:
    torch.manual_seed(0)
    if layout == "flat":
        return FFJORD(64, hidden=(16,), num_blocks=2, T=0.5)
    return FFJORD(image_shape=(1, 8, 8), field="conv", hidden=(4,), T=0.5)


def tight(model: FFJORD):
    return model.eval_solver.replace(atol=SOLVER_TOL, rtol=SOLVER_TOL)


# -- the GIF ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["flat", "image"])
def test_gif_frames_size_and_a_round_trip_that_reconstructs(tasks, test_images, layout,
                                                             tmp_path):
    task, model = tasks[layout], tiny_cnf(layout)
    model.train()
    pixels = test_images[:16]
    lines = []
    result = animate_images(model, task, pixels, tmp_path / "flow.gif", 3, solver=tight(model),
                            progress=lines.append)
    steps = 3 * len(model.blocks)
    assert result.num_frames == 2 * steps + 1
    with Image.open(result.path) as gif:
        assert gif.format == "GIF" and gif.n_frames == result.num_frames
        assert gif.size == (576, 312)  # 7.2 x 3.9 inches at 80 dpi
    assert result.path.stat().st_size < 3_000_000
    assert len(lines) == 3 and model.training, "progress lines; train mode restored"

    # The noise is the model's own data -> noise map of the (fixed-noise) inputs ...
    model.eval()
    expected = task.to_model(pixels, torch.Generator().manual_seed(0))[0]
    assert torch.equal(result.data, expected)
    with torch.no_grad():
        # (the block's own augmented solve; a Hutchinson log|det| rides along, z is exact)
        noise = model.to_noise(expected, solver=tight(model), divergence="hutchinson").z
    torch.testing.assert_close(result.noise, noise, atol=1e-3, rtol=0)
    assert (result.noise - result.data).abs().max() > 0.05, "the flow moved the points"
    # ... and the last frame is a second solve back, not the first one replayed: close to the
    # input, but not bit-identical.
    assert 0 < result.max_error < 1e-3
    assert result.max_error == float((result.reconstruction - result.data).abs().max())
    assert result.pixels_changed == 0


def test_gif_catches_a_map_that_is_not_inverted(tasks, test_images, tmp_path):
    """A model whose way back differs from its way there shows a large round-trip error."""
    model = tiny_cnf("flat")

    class Skewed(FFJORD):
        def trajectory(self, x, steps_per_block=20, *, to_data=True, **kw):
            frames = super().trajectory(x, steps_per_block, to_data=to_data, **kw)
            return frames + 0.5 * to_data * torch.linspace(0, 1, len(frames))[:, None, None]

    skewed = Skewed(64, hidden=(16,), num_blocks=2, T=0.5)
    skewed.load_state_dict(model.state_dict())
    result = animate_images(skewed, tasks["flat"], test_images[:4], tmp_path / "s.gif", 2)
    assert result.max_error > 0.4 and result.pixels_changed > 0


@pytest.mark.parametrize("to_data", [False, True])
def test_field_panels_show_the_velocity_of_the_motion(to_data):
    model = tiny_cnf("image").eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    k = 16
    frames = flow_frames(model, x, k, to_data=to_data, solver=tight(model))
    assert frames.states.shape == frames.velocities.shape == (k + 1, 3, 1, 8, 8)
    assert torch.equal(frames.states[0], x)
    T = float(model.blocks[0].T.detach())
    ts = [t for _, t, _ in frames.times]
    assert ts[0] == pytest.approx(T if to_data else 0.0)
    assert ts[-1] == pytest.approx(0.0 if to_data else T)
    # Finite differences along the motion match the mean velocity at the two ends (trapezoid).
    dt = T / k
    moved = (frames.states[1:] - frames.states[:-1]) / dt
    mean_velocity = 0.5 * (frames.velocities[1:] + frames.velocities[:-1])
    err = (moved - mean_velocity).norm() / mean_velocity.norm()
    assert err < 0.02, err


def test_gif_needs_a_cnf(tasks, test_images, tmp_path):
    flow = build_model("realnvp", image_shape=(1, 8, 8), num_blocks=2, hidden=(8,))
    assert not has_vector_field(flow) and has_vector_field(tiny_cnf("flat"))
    with pytest.raises(ConfigError, match="needs a CNF.*realnvp"):
        animate_images(flow, tasks["image"], test_images[:4], tmp_path / "x.gif")
    with pytest.raises(ConfigError, match="needs a CNF"):
        flow_frames(flow, torch.zeros(2, 1, 8, 8), 2, to_data=False)
    assert not (tmp_path / "x.gif").exists()


# -- interpolation ----------------------------------------------------------------------------
def test_slerp_against_closed_form():
    a = torch.tensor([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0], [6.0, 0.0, 0.0]], dtype=torch.float64)  # row 2: parallel
    w = torch.tensor([0.0, 1 / 3, 0.5, 1.0], dtype=torch.float64)
    out = slerp(a, b, w)
    assert out.shape == (2, 4, 3)
    assert torch.equal(out[:, 0], a) and torch.equal(out[:, -1], b)
    # Orthogonal unit vectors: the point at weight w is (cos(w pi/2), sin(w pi/2), 0).
    angle = w * math.pi / 2
    expected = torch.stack([torch.cos(angle), torch.sin(angle), torch.zeros(4,
                                                                          dtype=torch.float64)], 1)
    torch.testing.assert_close(out[0], expected)
    # Parallel rows: the straight line.
    torch.testing.assert_close(out[1, :, 0], 3.0 + 3.0 * w)
    # Gaussian latents in high dimension: the arc keeps the norm, the line shrinks it.
    g = torch.Generator().manual_seed(0)
    za, zb = torch.randn(2, 1, 4096, generator=g, dtype=torch.float64)
    mid_arc = slerp(za, zb, [0.5])[0, 0].norm() / math.sqrt(4096)
    mid_line = (0.5 * (za + zb)).norm() / math.sqrt(4096)
    assert abs(mid_arc - 1) < 0.05 and abs(mid_line - 1 / math.sqrt(2)) < 0.05


@pytest.mark.parametrize("kind", ["ffjord-flat", "ffjord-conv", "realnvp-multiscale"])
def test_interpolation_ends_are_the_latents_and_decode_to_the_images(tasks, test_images, kind,
                                                                     tmp_path):
    if kind.startswith("ffjord"):
        layout = "flat" if kind == "ffjord-flat" else "image"
        model, solver = tiny_cnf(layout), tight(tiny_cnf(layout))
        latent_shape = (64,) if layout == "flat" else (1, 8, 8)
    else:
        layout, solver, latent_shape = "image", None, (64,)  # the noise of a multiscale flow
        torch.manual_seed(0)
        model = build_model("realnvp", image_shape=(1, 8, 8), num_blocks=2, hidden=(8,),
                            levels=2)
    task = tasks[layout]
    a, b = test_images[:3], test_images[3:6]
    steps = 5
    result = interpolate_images(model, task, a, b, steps, tmp_path / "i.png", solver=solver,
                                seed=7)
    assert result.latents.shape == (3, steps, *latent_shape)
    assert result.pixels.shape == (3, steps, 1, 8, 8)
    ends = task.to_model(torch.cat([a, b]), torch.Generator().manual_seed(7))[0]
    model.eval()
    with torch.no_grad():
        out = model.to_noise(ends, solver=solver) if solver else model.to_noise(ends)
    z = out.z if hasattr(out, "z") else out[0]
    torch.testing.assert_close(result.latents[:, 0], z[:3], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.latents[:, -1], z[3:], atol=1e-4, rtol=0)
    torch.testing.assert_close(result.latents, slerp(z[:3], z[3:], result.weights), atol=1e-4,
                               rtol=0)  # along the arc, not the chord
    assert torch.equal(result.pixels[:, 0], a) and torch.equal(result.pixels[:, -1], b)
    assert not torch.equal(result.pixels[:, steps // 2], a), "the middle is not an end"
    with Image.open(result.path) as png:  # rows = pairs, columns = steps, 4x scale, 1-px gaps
        assert png.size == ((steps * 9 + 1) * 4, (3 * 9 + 1) * 4)


def test_choose_pairs_differ_in_label_and_repeat_with_the_seed():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    first, second = choose_pairs(labels, 6, seed=3)
    assert len(first) == 6 and bool((labels[first] != labels[second]).all())
    again = choose_pairs(labels, 6, seed=3)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])


# -- the CLI ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["cfm", "realnvp"])
def test_plot_writes_interpolations_and_for_a_cnf_the_gif(tmp_path, capsys, model):
    run = tmp_path / model
    options = (["--field", "mlp", "--hidden", "16"] if model == "cfm"
               else ["--num-blocks", "2", "--hidden", "8"])
    assert main(["train", "--data", "digits", "--model", model, *options, "--iters", "2",
                 "--batch-size", "32", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out
    assert (run / "interpolations.png").is_file() and f"wrote {run / 'interpolations.png'}" in out
    if model == "cfm":
        assert f"wrote {run / 'flow.gif'}" in out and "round trip" in out
        with Image.open(run / "flow.gif") as gif:
            assert gif.n_frames == 2 * 24 + 1
    else:
        assert not (run / "flow.gif").exists() and "no flow.gif" in out
    assert main(["plot", str(run), "--no-gif"]) == 0
    assert "flow.gif" not in capsys.readouterr().out
