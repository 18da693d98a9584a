"""Variational dequantization (Flow++) against independent answers.

The dequantizer's ``log q(u|x)`` is checked against the autograd Jacobian of its sampling map
in float64 and against scipy's logistic density, and it integrates to one; the bound is checked
against the exact discrete log-probability of a density whose cell integrals are known in
closed form (Gaussian CDFs), from both sides: below it always, close to it once ``q`` is
trained; with the dequantizer at the identity it equals the uniform-dequantization value to
rounding. A short run of the training loop tightens the bound, and everything survives a
config round trip.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

from flowlab.data.preprocess import Preprocess
from flowlab.errors import ConfigError, DataError
from flowlab.eval import evaluate_bits_per_dim
from flowlab.models import DensityModel, LossOutput, VariationalDequantization, build_model
from flowlab.models.dequantization import Dequantizer, logistic_log_prob
from flowlab.train.checkpoint import load_model, save_model
from flowlab.transforms.base import randomize_

F64 = torch.float64


def randomized(dequantizer: Dequantizer, std: float = 0.3, seed: int = 0) -> Dequantizer:
    """Parameters away from the identity (at initialization q is exactly uniform)."""
    return randomize_(dequantizer.double(), std=std, generator=torch.Generator().manual_seed(seed))


class DiagonalGaussian(DensityModel):
    """A density over model space with a closed-form CDF: independent N(mean_d, sd_d^2)."""

    name = "diagonal-gaussian-test"

    def __init__(self, mean, sd):
        super().__init__((len(mean),))
        self.mean = torch.nn.Parameter(torch.tensor(mean, dtype=F64))
        self.log_sd = torch.nn.Parameter(torch.tensor(sd, dtype=F64).log())

    def log_prob(self, y):
        dist = torch.distributions.Normal(self.mean, self.log_sd.exp())
        return dist.log_prob(y).sum(dim=1)

    def training_loss(self, y):
        nll = -self.log_prob(y).mean()
        return LossOutput(nll, {"nll": float(nll.detach())})

    def exact_log_p(self, pixels, levels: int, alpha: float) -> torch.Tensor:
        """log P(x): the Gaussian mass of each pixel's cell, mapped through the logit."""

        def edge(v):
            return torch.logit(alpha + (1 - 2 * alpha) * v / levels)

        sd = self.log_sd.exp()
        cdf = torch.distributions.Normal(self.mean, sd).cdf
        with torch.no_grad():
            return (cdf(edge(pixels + 1)) - cdf(edge(pixels))).log().sum(dim=1)


# -- the dequantizer q(u|x) ---------------------------------------------------------------
def test_samples_lie_in_the_open_unit_cube_and_log_q_matches_the_autograd_jacobian():
    deq = randomized(Dequantizer(4, levels=5, num_blocks=3, hidden=[16]))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5, (3, 4), generator=gen).to(F64)
    r = torch.rand(3, 4, generator=gen, dtype=F64)
    eps = torch.log(r) - torch.log1p(-r)
    u, log_q = deq.sample(x, eps=eps)
    assert u.shape == (3, 4) and log_q.shape == (3,)
    for i in range(3):
        def sample_map(e, i=i):
            return deq.sample(x[i:i + 1], eps=e[None])[0][0]

        jac = torch.autograd.functional.jacobian(sample_map, eps[i])
        base = float(stats.logistic.logpdf(eps[i].numpy()).sum())
        expected = base - float(torch.linalg.slogdet(jac)[1])
        assert float(log_q[i].detach()) == pytest.approx(expected, abs=1e-10)
        assert float(torch.linalg.slogdet(jac)[0]) != 0  # invertible
    # the density of given u (data -> noise direction) agrees with the sampling side
    torch.testing.assert_close(deq.log_prob(u, x), log_q, rtol=0, atol=1e-10)
    # independent of the base density's implementation
    assert float(logistic_log_prob(eps[:1])) == pytest.approx(
        float(stats.logistic.logpdf(eps[0].numpy()).sum()), abs=1e-12)
    # many draws, extreme ones included, stay strictly inside (0, 1) in float32 too
    wide = Dequantizer(4, levels=5, num_blocks=2, hidden=[8])
    randomize_(wide, std=1.0, generator=torch.Generator().manual_seed(2))
    xs = torch.randint(0, 5, (20000, 4), generator=gen).float()
    us, log_qs = wide.sample(xs, generator=gen)
    assert bool(((us > 0) & (us < 1)).all()) and bool(torch.isfinite(log_qs).all())


def test_q_integrates_to_one_in_every_cell_context():
    deq = randomized(Dequantizer(2, levels=3, num_blocks=2, hidden=[8]), std=0.2, seed=3)
    n = 500
    mid = (torch.arange(n, dtype=F64) + 0.5) / n
    grid = torch.stack(torch.meshgrid(mid, mid, indexing="ij"), -1).reshape(-1, 2)
    for pixels in ([0, 2], [1, 1]):
        x = torch.tensor([pixels], dtype=F64).expand(len(grid), 2)
        with torch.no_grad():
            mass = float(deq.log_prob(grid, x).exp().mean())
        assert mass == pytest.approx(1.0, abs=5e-3), (pixels, mass)


def test_dequantizer_starts_uniform():
    deq = Dequantizer(6, levels=17).double()
    x = torch.randint(0, 17, (5, 6)).to(F64)
    u, log_q = deq.sample(x, generator=torch.Generator().manual_seed(0))
    assert float(log_q.detach().abs().max()) < 1e-12
    r = torch.rand(5, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(u, r, rtol=0, atol=1e-12)


# -- the bound ------------------------------------------------------------------------------
LEVELS, ALPHA = 4, 0.05


def gaussian_wrapper(seed: int = 0) -> VariationalDequantization:
    torch.manual_seed(seed)
    inner = DiagonalGaussian([-0.5, 0.4], [0.15, 0.2])
    return VariationalDequantization(inner, levels=LEVELS, alpha=ALPHA,
                                     dequantizer={"num_blocks": 4, "hidden": [32, 32]}).double()


def bound_estimate(model, x, draws: int, seed: int) -> tuple[float, float]:
    with torch.no_grad():
        values = model.log_prob(x.expand(draws, -1), generator=torch.Generator().manual_seed(seed))
    return float(values.mean()), float(values.std()) / math.sqrt(draws)


def test_bound_is_below_the_exact_log_probability_and_closes_up_when_q_is_trained():
    model = gaussian_wrapper()
    x = torch.tensor([[1.0, 2.0]], dtype=F64)
    log_p = float(model.inner.exact_log_p(x, LEVELS, ALPHA))
    uniform, uniform_se = bound_estimate(model, x, 20000, seed=1)
    gap_uniform = log_p - uniform
    assert gap_uniform > 0.1 + 4 * uniform_se  # the case has something to learn
    # a randomized q is still a bound
    randomized(model.dequantizer, std=0.3, seed=5)
    loose, loose_se = bound_estimate(model, x, 20000, seed=2)
    assert loose < log_p + 4 * loose_se
    # train q alone (the density is fixed): the bound rises towards log P(x), never past it
    model.dequantizer.load_state_dict(gaussian_wrapper().dequantizer.state_dict())
    model.inner.requires_grad_(False)
    optimizer = torch.optim.Adam(model.dequantizer.parameters(), lr=3e-3)
    for _ in range(400):
        optimizer.zero_grad()
        model.training_loss(x.expand(256, -1)).loss.backward()
        optimizer.step()
    trained, trained_se = bound_estimate(model, x, 20000, seed=3)
    assert trained < log_p + 4 * trained_se, (trained, log_p)
    assert log_p - trained < 0.25 * gap_uniform, (trained, uniform, log_p)


def test_identity_dequantizer_gives_the_uniform_dequantization_value():
    torch.manual_seed(0)
    inner = build_model("maf", dim=16, num_blocks=2, hidden=[16])
    randomize_(inner, std=0.1, generator=torch.Generator().manual_seed(4))
    model = VariationalDequantization(inner, levels=LEVELS, alpha=ALPHA).double()
    x = torch.randint(0, LEVELS, (6, 16), generator=torch.Generator().manual_seed(5)).to(F64)
    bound = model.log_prob(x, generator=torch.Generator().manual_seed(6))
    # uniform dequantization with the same noise, by the preprocessing of the uniform path
    r = torch.rand(6, 16, generator=torch.Generator().manual_seed(6), dtype=F64)
    y, ldj = Preprocess(LEVELS, ALPHA)(x, noise=r)
    with torch.no_grad():
        expected = model.inner.log_prob(y) + ldj
    torch.testing.assert_close(bound.detach(), expected, rtol=0, atol=1e-10)
    # and the training loss is its negative mean (the inner NLL plus the rest of the bound)
    torch.manual_seed(7)
    loss = model.training_loss(x).loss
    torch.manual_seed(7)
    assert float(loss.detach()) == pytest.approx(float(-model.log_prob(x).detach().mean()),
                                                 rel=1e-12)


# -- with the training loop, evaluation and run folders ----------------------------------------
@pytest.fixture(scope="module")
def digits_task():
    pytest.importorskip("sklearn")
    from flowlab.data.image_task import ImageTask

    return ImageTask("digits", dequantization="variational")


def small_digits_model(task, seed: int = 0) -> VariationalDequantization:
    torch.manual_seed(seed)
    inner = build_model("maf", dim=task.dim, num_blocks=2, hidden=[32])
    return VariationalDequantization(inner, levels=task.levels, alpha=task.alpha,
                                     dequantizer={"num_blocks": 2, "hidden": [32]})


def validation_bits_per_dim(model, points, task, draws: int = 4) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        bounds = torch.stack([model.log_prob(points, generator=gen) for _ in range(draws)])
    return float(-bounds.mean()) / (task.dim * math.log(2))


def test_short_training_run_tightens_the_bound(digits_task):
    from flowlab.train import TrainConfig, train

    task = digits_task
    model = small_digits_model(task)
    points = task.validation_points()
    assert torch.equal(points, task.valid.images.float().reshape(len(points), -1))
    before = validation_bits_per_dim(model, points, task)
    result = train(model, task.sampler(), TrainConfig(iters=200, batch_size=128, lr=5e-3),
                   progress=False, val_points=points)
    after = validation_bits_per_dim(model, points, task)
    assert after < before - 0.5, (before, after)
    assert result.last_metrics["log_q"] > 1e-3  # -entropy of q: 0 only for uniform noise
    # the learned q beats uniform noise for the density it was trained with
    uniform = small_digits_model(task)
    uniform.inner.load_state_dict(model.inner.state_dict())
    learned = validation_bits_per_dim(model, points, task, draws=8)
    assert learned < validation_bits_per_dim(uniform, points, task, draws=8) - 0.01


def test_bits_per_dim_evaluation_and_config_round_trip(digits_task, tmp_path):
    task = digits_task
    model = small_digits_model(task, seed=3)
    randomize_(model.dequantizer, std=0.05, generator=torch.Generator().manual_seed(8))
    test = task.test_split()
    result = evaluate_bits_per_dim(model, task, test, n_test=40, probes=4)
    assert result.dequantization == "variational" and result.probes == 4
    assert result.estimator == "closed form" and result.nfe is None
    assert 0 < result.estimator_se < result.bpd_se
    again = evaluate_bits_per_dim(model, task, test, n_test=40, probes=4)
    assert again.bits_per_dim == result.bits_per_dim
    # one draw: no estimator s.e.; mismatched task: a clear error
    assert evaluate_bits_per_dim(model, task, test, n_test=40).estimator_se is None
    from flowlab.data.image_task import ImageTask

    with pytest.raises(ConfigError, match="dequantization"):
        evaluate_bits_per_dim(model, ImageTask("digits"), test, n_test=40)
    # config round trip: JSON, rebuild, same weights -> the same bound with the same noise
    config = json.loads(json.dumps(model.config()))
    assert config["inner"] == "maf" and config["levels"] == 17
    rebuilt = build_model("variational-dequantization", **config)
    rebuilt.load_state_dict(model.state_dict())
    x = test.images[:5].float().reshape(5, -1)
    a = model.log_prob(x, generator=torch.Generator().manual_seed(1))
    b = rebuilt.log_prob(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    save_model(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    assert torch.equal(loaded.log_prob(x, generator=torch.Generator().manual_seed(1)), a)
    # and the task's
    task_config = json.loads(json.dumps(task.config()))
    assert task_config["dequantization"] == "variational"
    assert ImageTask.from_config(task_config).dequantization == "variational"
    assert "dequantization" not in ImageTask("digits").config()  # uniform: as before


def test_the_task_hands_raw_pixels_and_reads_samples_in_pixel_units(digits_task):
    from flowlab.data.image_task import ImageTask

    task = digits_task
    pixels = task.valid.images[:3]
    y, ldj = task.to_model(pixels, torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(y, pixels.to(F64).reshape(3, -1)) and torch.equal(ldj, torch.zeros(3,
                                                                                  dtype=F64))
    v = pixels.to(F64).reshape(3, -1) + 0.999
    assert torch.equal(task.to_pixels(v), pixels)
    assert torch.equal(task.to_pixels(torch.full((1, 64), 40.0)),
                       torch.full((1, 1, 8, 8), 16, dtype=torch.uint8))
    # the uniform path is the preprocessing, unchanged
    uniform = ImageTask("digits")
    y, ldj = uniform.to_model(pixels, torch.Generator().manual_seed(0))
    y0, ldj0 = Preprocess(17, 0.05)(pixels, torch.Generator().manual_seed(0),
                                     dtype=torch.float32)
    assert torch.equal(y, y0.reshape(3, -1)) and torch.equal(ldj, ldj0)
    # the model's samples land in pixel cells
    model = small_digits_model(task)
    assert task.to_pixels(model.sample((4,))).shape == (4, 1, 8, 8)


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="maximum likelihood"):
        VariationalDequantization("cfm", {"dim": 4, "hidden": [8]}, levels=4)
    with pytest.raises(ConfigError, match="family"):
        VariationalDequantization("maf", {"dim": 4}, levels=4, dequantizer={"family": "nope"})
    with pytest.raises(ConfigError, match="context"):
        VariationalDequantization("maf", {"dim": 4}, levels=4, dequantizer={"family": "planar"})
    model = VariationalDequantization("maf", {"dim": 4}, levels=4)
    with pytest.raises(DataError, match="raw pixels"):
        model.log_prob(torch.rand(3, 4))  # scaled, not raw pixels
    with pytest.raises(DataError, match="0..3"):
        model.log_prob(torch.full((3, 4), 7.0))
    with pytest.raises(ConfigError, match="solves no ODE"):
        model.log_prob(torch.zeros(3, 4), solver=object())
    assert not hasattr(model, "eval_solver") and getattr(model, "solver", None) is None


def test_command_line_trains_evaluates_samples_and_resumes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from flowlab.cli import main

    run = tmp_path / "vd"
    small = ["--num-blocks", "2", "--hidden", "32", "--batch-size", "128", "--no-progress"]
    assert main(["train", "--data", "digits", "--model", "maf", "--dequantization",
                 "variational", "--iters", "40", "--out", str(run), *small]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "variational-dequantization"
    assert config["model_options"]["inner"] == "maf"
    assert config["data"]["dequantization"] == "variational"
    assert main(["eval", str(run), "--n-test", "60"]) == 0
    out = capsys.readouterr().out
    assert "variational dequantization" in out and "upper bound" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["dequantization"] == "variational" and report["probes"] == 4  # default
    assert 0 < report["estimator_se"] < report["bpd_se"]
    assert 1.0 < report["bits_per_dim"] < math.log2(17), report
    assert main(["eval", str(run), "--n-test", "60", "--probes", "1"]) == 0
    assert json.loads((run / "eval.json").read_text())["estimator_se"] is None
    assert "needs --probes 2" in capsys.readouterr().out
    assert main(["sample", str(run), "-n", "8"]) == 0
    assert main(["train", "--resume", str(run), "--iters", "45", "--no-progress"]) == 0
    # uniform runs: a deterministic score takes one probe; 2-D data has no dequantization
    plain = tmp_path / "u"
    assert main(["train", "--data", "digits", "--model", "maf", "--iters", "5",
                 "--out", str(plain), *small]) == 0
    assert "dequantization" not in json.loads((plain / "config.json").read_text())["data"]
    capsys.readouterr()
    assert main(["eval", str(plain), "--probes", "2"]) == 2
    assert "deterministic" in capsys.readouterr().err
    assert main(["train", "--data", "moons", "--dequantization", "variational", "--iters", "1",
                 "--out", str(tmp_path / "m")]) == 2
    assert "image data" in capsys.readouterr().err


def test_a_zero_uniform_draw_stays_finite(monkeypatch):
    """torch.rand can return exactly 0 (one draw in 2^24 in float32): logit(0) = -inf."""
    deq = randomized(Dequantizer(4, levels=5, num_blocks=2, hidden=[8])).float()
    monkeypatch.setattr(torch, "rand", lambda shape, generator=None, **kw: torch.zeros(shape,
                                                                                       **kw))
    u, log_q = deq.sample(torch.ones(3, 4))
    assert bool(((u > 0) & (u < 1)).all()) and bool(torch.isfinite(log_q).all())
