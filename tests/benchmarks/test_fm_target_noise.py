"""The target-noise benchmark: its exact marginal velocity of 8gaussians, and its report."""

import math

import pytest
import torch
from benchload import load_benchmark

from flowlab.cli import main as flowlab
from flowlab.data import get_dataset
from flowlab.fm.paths import LinearPath

noise = load_benchmark("fm_target_noise.py", "fm_target_noise_under_test")


@pytest.mark.parametrize("t", [0.3, 0.7])
def test_exact_velocity_matches_a_monte_carlo_posterior_mean(t):
    data, path = get_dataset("8gaussians"), LinearPath()
    generator = torch.Generator().manual_seed(0)
    y = torch.tensor([[2.0, 2.2], [2.9, 0.2], [-2.5, 0.4]], dtype=torch.float64) * (1 - t)
    x = data.sample(400_000, generator=generator).to(torch.float64)
    a, sigma = 1 - t, path.sigma_min + (1 - path.sigma_min) * t
    # self-normalized importance sampling of E[x | x_t = y] with the data as proposal
    weights = torch.softmax(-(y[:, None] - a * x[None]).pow(2).sum(2) / (2 * sigma**2), dim=1)
    mean = weights @ x
    monte_carlo = (1 - path.sigma_min) * (y - a * mean) / sigma - mean
    ess = 1 / weights.pow(2).sum(1)
    exact = noise.exact_velocity(data.centres, data.std, path, y, t)
    # the estimate's error is about (a / sigma + 1) * posterior sd / sqrt(ess); a wrong formula
    # is off by order one
    sd = (weights * (x[None] - mean[:, None]).pow(2).sum(2)).sum(1).sqrt()
    tolerance = 5 * (a / sigma + 1) * sd / ess.sqrt()
    assert ((exact - monte_carlo).abs().max(1).values < tolerance).all()
    assert (ess > 1000).all()


def test_report_scores_targets_and_a_trained_field(tmp_path):
    run = tmp_path / "run"
    flowlab(["train", "--data", "8gaussians", "--model", "cfm", "--field", "fourier",
             "--hidden", "16,16", "--iters", "3", "--batch-size", "64", "--out", str(run),
             "--no-progress", "--val-every", "0"])
    noise.main(["--runs", str(run), "--batch-size", "256", "--batches", "1", "--results",
                str(tmp_path)])
    lines = (tmp_path / "fm_target_noise.md").read_text().splitlines()
    start = lines.index("| t | run |")  # the second table: the field's Jacobian error
    rows = {float(line.split("|")[1]): [float(v) for v in line.split("|")[2:5]]
            for line in lines[:start] if line.startswith("| 0.")}
    assert sorted(rows) == list(noise.TIMES)
    for t, (conditional, averaged, field) in rows.items():
        assert all(math.isfinite(v) and v >= 0 for v in (conditional, averaged, field))
        if t >= 0.3:  # mid-path and beyond the batch average is far less noisy
            assert averaged < conditional / 5
    jacobian = [line for line in lines[start:] if line.startswith("| 0.")]
    assert [float(line.split("|")[1]) for line in jacobian] == list(noise.TIMES)
    assert all(math.isfinite(float(line.split("|")[2])) and float(line.split("|")[2]) >= 0
               for line in jacobian)


def test_jacobian_of_the_exact_velocity_matches_finite_differences():
    data, path = get_dataset("8gaussians"), LinearPath()
    y = torch.tensor([[2.0, 2.2], [0.3, -0.1], [-2.5, 0.4]], dtype=torch.float64)
    for t in (0.05, 0.5):
        def velocity(q, t=t):
            return noise.exact_velocity(data.centres, data.std, path, q, t)
        got = noise.jacobian(velocity, y)
        step = 1e-6
        for j in range(2):
            shift = torch.zeros(1, 2, dtype=torch.float64)
            shift[0, j] = step
            column = (velocity(y + shift) - velocity(y - shift)) / (2 * step)
            torch.testing.assert_close(got[:, :, j], column, rtol=1e-6, atol=1e-6)
    # a linear map's Jacobian is its matrix, row i the derivatives of output i
    matrix = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    jac = noise.jacobian(lambda q: q @ matrix.T, y)
    torch.testing.assert_close(jac, matrix.expand(3, 2, 2))


def test_a_run_on_another_path_is_refused(tmp_path):
    run = tmp_path / "vp"
    flowlab(["train", "--data", "8gaussians", "--model", "cfm", "--path", "vp",
             "--hidden", "8", "--iters", "1", "--batch-size", "16", "--out", str(run),
             "--no-progress", "--val-every", "0"])
    with pytest.raises(SystemExit):
        noise.main(["--runs", str(run), "--batches", "1", "--results", str(tmp_path)])


def test_the_averaged_targets_bias_is_at_its_monte_carlo_floor():
    data, path = get_dataset("8gaussians"), LinearPath()
    rows = noise.target_bias(data, path, batch_size=64, points=20, repeats=300)
    assert [row["t"] for row in rows] == list(noise.TIMES)
    for row in rows:
        # the batch average is consistent with a bias of order 1/batch; at this resolution it
        # is indistinguishable from the floor, while a wrong posterior draw is far above it
        assert row["bias2"] < 3 * row["floor"] + 1e-3
        assert 0 < row["variance"] < 3
