"""Plots and animations: files are valid images, grid integrals match closed forms, the arrows
of the flow animation point where the particles actually move."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowlab.models import FFJORD
from flowlab.viz import (
    animate_flow,
    frame_schedule,
    grid_log_prob,
    grid_mass,
    motion_field,
    plot_density_comparison,
    plot_samples,
    plot_training_curves,
)


class GaussianMixture2D:
    """Stand-in toy dataset: equal-weight isotropic Gaussians with a closed-form log-density."""

    name = "two gaussians"
    bounds = 4.0

    def __init__(self) -> None:
        self.means = torch.tensor([[-1.5, 0.0], [1.5, 0.5]])
        self.std = 0.6

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        index = torch.randint(0, len(self.means), (n,), generator=generator)
        return self.means[index] + self.std * torch.randn(n, 2, generator=generator)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, None, :] - self.means.to(x)
        per_component = (
            -0.5 * diff.pow(2).sum(-1) / self.std**2
            - 2 * math.log(self.std)
            - math.log(2 * math.pi)
        )
        return torch.logsumexp(per_component, dim=1) - math.log(len(self.means))


def standard_normal_2d(x: torch.Tensor) -> torch.Tensor:
    return -0.5 * x.pow(2).sum(1) - math.log(2 * math.pi)


@pytest.fixture
def model() -> FFJORD:
    torch.manual_seed(0)
    return FFJORD(2, hidden=(8, 8), num_blocks=2)


def assert_image(path, fmt: str) -> Image.Image:
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    image = Image.open(path)
    assert image.format == fmt
    return image


# -- grid_log_prob ----------------------------------------------------------------------------
def test_grid_log_prob_standard_gaussian_integrates_to_one_and_matches_closed_form():
    xs, ys, logp = grid_log_prob(standard_normal_2d, bounds=5.0, resolution=50, chunk=333)
    assert xs.shape == ys.shape == (50,) and logp.shape == (50, 50)
    assert abs(grid_mass(logp, 5.0) - 1.0) < 1e-3
    # Cell centres of [-5, 5] cut into 50 cells.
    np.testing.assert_allclose(xs, -5.0 + 0.2 * (np.arange(50) + 0.5), atol=1e-12)
    gx, gy = np.meshgrid(xs, ys)
    expected = -0.5 * (gx**2 + gy**2) - math.log(2 * math.pi)
    np.testing.assert_allclose(logp, expected, atol=1e-5)


def test_grid_log_prob_rows_are_y_and_chunks_cover_every_point():
    calls = []

    def linear(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x[:, 0] + 10.0 * x[:, 1]

    xs, ys, values = grid_log_prob(linear, bounds=1.0, resolution=7, chunk=10)
    assert sum(calls) == 49 and max(calls) <= 10
    np.testing.assert_allclose(values, xs[None, :] + 10.0 * ys[:, None], atol=1e-5)


# -- density figures --------------------------------------------------------------------------
def test_plot_density_comparison_writes_png_with_unit_model_mass(model, tmp_path):
    model.train()
    result = plot_density_comparison(
        model, GaussianMixture2D(), tmp_path / "density.png", resolution=40, n_samples=500,
        solver=model.eval_solver.replace(atol=1e-5, rtol=1e-5),
    )
    image = assert_image(tmp_path / "density.png", "PNG")
    assert image.size[0] > 300 and image.size[1] > 300
    assert result["path"] == str(tmp_path / "density.png")
    assert abs(result["model_mass"] - 1.0) < 2e-2
    assert abs(result["true_mass"] - 1.0) < 1e-3
    # Gibbs' inequality: cross-entropy >= entropy, here by a lot (untrained model).
    assert result["cross_entropy_nats"] > result["true_entropy_nats"] + 0.1
    assert model.training, "the model's train/eval mode must be restored"


def test_plot_samples_writes_png(tmp_path):
    samples = GaussianMixture2D().sample(300, generator=torch.Generator().manual_seed(0))
    out = plot_samples(samples, tmp_path / "sub" / "samples.png", 4.0, "data samples")
    assert_image(out, "PNG")
    with pytest.raises(ValueError, match="shape"):
        plot_samples(torch.zeros(5, 3), tmp_path / "bad.png", 4.0, "bad")


def test_plot_training_curves_full_records(tmp_path):
    records = [
        {"step": i, "seconds": 0.5 * i, "nll": 3.0 - i / 20, "nfe_forward": 26 + i,
         "nfe_backward": 30 + 2 * i, **({"val_nll": 3.1 - i / 20} if i % 5 == 0 else {})}
        for i in range(20)
    ]
    assert_image(plot_training_curves(records, tmp_path / "curves.png", entropy=2.0), "PNG")


@pytest.mark.parametrize(
    "records",
    [
        [
            {"step": 1},
            {"seconds": 2.0, "nll": 3.0},
            {"event": "checkpoint"},
            {"step": 3, "nll": float("nan"), "nfe_forward": 20},
            {"step": 4, "nll": "not a number", "nfe_backward": None},
        ],
        [{"nll": 3.0}, {"nll": 2.5}],
        [],
    ],
    ids=["mixed", "nll-only", "empty"],
)
def test_plot_training_curves_skips_missing_keys(records, tmp_path):
    assert_image(plot_training_curves(records, tmp_path / "curves.png"), "PNG")


# -- animation --------------------------------------------------------------------------------
@pytest.mark.parametrize("round_trip, show_field", [(True, True), (False, False)])
def test_animate_flow_writes_gif_with_expected_frames(model, tmp_path, round_trip, show_field):
    K = 3
    out = animate_flow(
        model, tmp_path / "flow.gif", n=64, frames_per_block=K, fps=10, round_trip=round_trip,
        show_field=show_field, generator=torch.Generator().manual_seed(0), field_grid=5,
    )
    image = assert_image(out, "GIF")
    forward = 1 + K * len(model.blocks)
    assert image.n_frames == (2 * forward - 1 if round_trip else forward)
    assert image.size == (320, 320)


def test_frame_schedule_matches_trajectory_and_field_points_along_motion(model):
    """Independent check of the arrows: finite differences of the solved trajectory."""
    K = 40
    schedule = frame_schedule(model, K)
    z = torch.randn(50, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        positions = model.trajectory(z, K, to_data=True)
    assert len(schedule) == positions.shape[0] == 1 + K * len(model.blocks)
    assert schedule[0] == (1, pytest.approx(float(model.blocks[1].T.detach())))
    assert schedule[-1] == (0, pytest.approx(0.0))
    checked = 0
    for k in range(len(schedule) - 1):
        (block, t0), (next_block, t1) = schedule[k], schedule[k + 1]
        if block != next_block:
            continue  # the frame closing a block: the next step is taken in another block
        velocity = 0.5 * (
            motion_field(model, block, t0, positions[k])
            + motion_field(model, block, t1, positions[k + 1])
        )  # trapezoid rule along the step, noise -> data
        step = positions[k + 1] - positions[k]
        expected = velocity * (t0 - t1)
        assert torch.allclose(step, expected, atol=2e-5, rtol=1e-2), k
        reverse = motion_field(model, block, t1, positions[k + 1], to_data=False)
        assert torch.equal(reverse, -motion_field(model, block, t1, positions[k + 1]))
        checked += 1
    assert checked == len(schedule) - len(model.blocks)
