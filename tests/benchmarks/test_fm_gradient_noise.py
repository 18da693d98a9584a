"""The gradient-noise benchmark: its score-matching loss, its fresh-block target, its report."""

import math

import pytest
import torch
from benchload import load_benchmark

from flowlab.cli import main as flowlab
from flowlab.data import get_dataset
from flowlab.fm.paths import LinearPath

noise = load_benchmark("fm_gradient_noise.py", "fm_gradient_noise_under_test")


class _Field(torch.nn.Module):
    """The exact velocity of 8gaussians at one time plus a small network, with the ``(t, y)``
    call of a CNF field: near the optimum, where the regression's gradient is small and a
    wrong score term would stand out."""

    def __init__(self, t):
        super().__init__()
        torch.manual_seed(0)
        self.t, self.data, self.path = t, get_dataset("8gaussians"), LinearPath()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 2)).double()

    def forward(self, t, y):
        exact = noise.exact_velocity(self.data.centres, self.data.std, self.path, y, self.t)
        return exact + 0.1 * self.net(torch.cat([y, t.reshape(-1, 1)], 1))


def _gradient(field, loss):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(field.parameters()))])


# Monte-Carlo error of the 200,000-point estimate (it halves with four times the points):
# about 0.015 at t = 0.05 and 0.05-0.10 at t = 0.3, where the loss is noisier
@pytest.mark.parametrize("t, tolerance", [(0.05, 0.05), (0.3, 0.2)])
def test_score_matching_has_the_gradient_of_the_exact_regression(t, tolerance):
    data, path, field = get_dataset("8gaussians"), LinearPath(), _Field(t)
    generator = torch.Generator().manual_seed(1)
    x = data.sample(200_000, generator=generator).to(torch.float64)
    z = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    times = torch.full((x.shape[0],), t, dtype=torch.float64)
    y, _ = path.point_and_velocity(x, z, times)
    exact = noise.exact_velocity(data.centres, data.std, path, y, t)
    reference = _gradient(field, (field(times, y) - exact).pow(2).sum(1).mean())
    rows = noise.score_matching_rows(field, path, times, y, generator)
    error = (_gradient(field, rows.mean()) - reference).norm() / reference.norm()
    assert error < tolerance
    # without its divergence term the loss regresses on alpha y alone: far from the gradient
    a = 1 - t
    plain = _gradient(field, (field(times, y) + y / a).pow(2).sum(1).mean())
    assert (plain - reference).norm() / reference.norm() > 2 * tolerance


def test_fresh_blocks_average_over_the_own_point_and_the_blocks_references():
    path = LinearPath()
    generator = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(6, 2, generator=generator, dtype=torch.float64)
    z = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    references = 2 * torch.randn(3, 4, 2, generator=generator, dtype=torch.float64)
    for t in (0.05, 0.4, 0.95):
        got = noise.fresh_block_velocity(path, x, z, t, references)
        a, sigma = 1 - t, path.sigma_min + (1 - path.sigma_min) * t
        for i in range(6):
            y = a * x[i] + sigma * z[i]
            points = torch.cat([x[i:i + 1], references[i // 2]])
            weights = torch.softmax(-(y - a * points).pow(2).sum(1) / (2 * sigma**2), dim=0)
            mean = weights @ points
            expected = (1 - path.sigma_min) * (y - a * mean) / sigma - mean
            torch.testing.assert_close(got[i], expected)
    # another block's references change the row: each block has its own
    swapped = noise.fresh_block_velocity(path, x, z, 0.95, references.flip(0))
    assert not torch.allclose(swapped[4:], got[4:])


def test_report_and_bad_options(tmp_path):
    run = tmp_path / "run"
    flowlab(["train", "--data", "8gaussians", "--model", "cfm", "--field", "fourier",
             "--hidden", "16,16", "--iters", "3", "--batch-size", "64", "--out", str(run),
             "--no-progress", "--val-every", "0"])
    noise.main([str(run), "--batch-size", "64", "--batches", "3", "--block", "16",
                "--references", "32", "--results", str(tmp_path)])
    lines = (tmp_path / "fm_gradient_noise.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("| 0.")]
    noise_rows = {float(line.split("|")[1]): [float(v) for v in line.split("|")[2:-1]]
                  for line in table[:len(noise.TIMES)]}
    assert sorted(noise_rows) == list(noise.TIMES)
    for values in noise_rows.values():
        assert len(values) == len(noise.LOSSES) + 1
        assert all(math.isfinite(v) and v >= 0 for v in values)
    assert len(table) == 2 * len(noise.TIMES)  # and the targets' squared errors
    for bad in (["--block", "48"], ["--batches", "1"], ["--references", "0"]):
        with pytest.raises(SystemExit):
            noise.main([str(run), "--batch-size", "64", *bad, "--results", str(tmp_path)])
