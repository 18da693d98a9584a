import json
import math

import pytest
import torch

pytest.importorskip("zuko")

from benchload import load_benchmark  # noqa: E402

from flowlab.data import get_dataset  # noqa: E402
from flowlab.eval.nll import mean_and_se  # noqa: E402
from flowlab.models import FFJORD  # noqa: E402
from flowlab.ode import SolverConfig  # noqa: E402
from flowlab.train import TrainConfig  # noqa: E402
from flowlab.train import train as flowlab_train  # noqa: E402

zc = load_benchmark("peers/zuko_cnf.py", "zuko_cnf_peer")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-second run on 8gaussians with a snapshot at 1 s and one at the budget."""
    out = tmp_path_factory.mktemp("zuko-8gaussians")
    result = zc.train("8gaussians", 2.0, out, snapshot_at=(1,), batch_size=64, hidden=(16, 16),
                      log_every=1)
    return out, result


def test_data_stream_is_the_one_flowlab_trains_on():
    dataset = get_dataset("moons")
    seen = []

    def recording(n, generator):
        seen.append(dataset.sample(n, generator=generator))
        return seen[-1]

    model = FFJORD(2, hidden=(8,), solver=SolverConfig("rk4", steps=2))
    flowlab_train(model, recording, TrainConfig(iters=3, batch_size=32, seed=5), progress=False)
    # The loop draws the first batch once to check it, then draws it again from the same state.
    assert len(seen) == 4 and torch.equal(seen[0], seen[1])
    stream = zc.data_stream(dataset, 32, seed=5)
    for batch in seen[1:]:
        assert torch.equal(next(stream), batch)


def test_train_writes_config_log_and_snapshots(run):
    out, result = run
    config = json.loads((out / "config.json").read_text())
    assert config["peer"] == "zuko" and config["dataset"] == "8gaussians"
    assert config["hidden"] == [16, 16] and config["seconds"] == 2.0
    index = json.loads((out / "snapshots.json").read_text())
    assert [s["at"] for s in index] == [1.0, 2.0]
    assert [s["file"] for s in index] == ["t00001.safetensors", "t00002.safetensors"]
    clocks = [s["seconds"] for s in index]
    steps = [s["step"] for s in index]
    assert clocks == sorted(clocks) and clocks[0] < clocks[1]
    assert steps[0] < steps[1] == result["steps"]
    assert all(s["seconds"] >= s["at"] for s in index)
    assert result["seconds"] >= 2.0 and result["seconds"] == pytest.approx(clocks[-1])
    files = sorted(p.name for p in (out / "snapshots").iterdir())
    assert files == [s["file"] for s in index]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, result["steps"] + 1))
    assert all(math.isfinite(r["loss"]) for r in log)


def test_nfe_counts_are_positive_and_follow_zukos_solver(run):
    _, result = run
    out, _ = run
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    for r in log:
        # 7 stages per trial step forward; 6 per accepted step in the adjoint replay.
        assert r["nfe_forward"] > 0 and r["nfe_forward"] % 7 == 0
        assert r["nfe_backward"] > 0 and r["nfe_backward"] % 6 == 0
        assert r["nfe_backward"] // 6 <= r["nfe_forward"] // 7
    samples, nfe = zc.sample(result["flow"], 100, seed=3)
    assert samples.shape == (100, 2) and torch.isfinite(samples).all() and nfe > 0
    again, _ = zc.sample(result["flow"], 100, seed=3)
    assert torch.equal(samples, again)


def test_load_flow_reproduces_the_trained_flow(run):
    out, result = run
    x = torch.randn(200, 2)
    loaded = zc.load_flow(out)  # the last snapshot: the final weights
    with torch.no_grad():
        expected = result["flow"].eval()().log_prob(x)
        assert torch.equal(loaded().log_prob(x), expected)
        first = zc.load_flow(out, "t00001.safetensors")
        assert not torch.equal(first().log_prob(x), expected)


def test_evaluate_se_matches_the_per_point_values(run):
    _, result = run
    points = torch.randn(300, 2, dtype=torch.float64)
    report = zc.evaluate(result["flow"], points, batch_size=128)
    logp, nfes = zc.log_density(result["flow"], points, batch_size=128)
    mean, se = mean_and_se(-logp)
    assert report["n_test"] == 300 and len(nfes) == 3 and min(nfes) > 0
    assert report["nll_nats"] == pytest.approx(mean, abs=1e-12)
    assert report["nll_se"] == pytest.approx(se, abs=1e-12)
    assert report["nfe"] == pytest.approx(sum(nfes) / 3)
    assert next(result["flow"].parameters()).dtype == torch.float32  # evaluated on a copy


def test_a_non_finite_loss_names_the_step(tmp_path, monkeypatch):
    build = zc.build_flow

    def broken(dim, hidden, **kwargs):
        flow = build(dim, hidden, **kwargs)
        for name, buffer in flow.base.named_buffers():
            if "loc" in name or name.endswith("0"):
                buffer.fill_(math.inf)  # log N(z; inf, 1) = -inf: an infinite loss at step 0
        return flow

    monkeypatch.setattr(zc, "build_flow", broken)
    with pytest.raises(zc.NonFiniteError, match="step 0"):
        zc.train("moons", 1.0, tmp_path / "run", batch_size=16, hidden=(8,))


def test_exact_log_prob_of_an_untrained_flow_integrates_to_one():
    torch.manual_seed(1)
    flow = zc.build_flow(2, hidden=(16, 16))
    with torch.no_grad():  # a stronger field than the initialisation, far from the base
        flow.transform.ode[-1].weight.mul_(8.0)
    h = 0.2
    axis = torch.arange(-7.0, 7.0 + h / 2, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    logp, _ = zc.log_density(flow, grid, batch_size=grid.shape[0], atol=1e-6, rtol=1e-5)
    assert float(logp.exp().sum()) * h * h == pytest.approx(1.0, abs=2e-2)
    # Not just the base density: far from N(0, I) in total variation.
    base = -0.5 * grid.pow(2).sum(-1) - math.log(2 * math.pi)
    assert 0.5 * float((logp.exp() - base.exp()).abs().sum()) * h * h > 0.2
