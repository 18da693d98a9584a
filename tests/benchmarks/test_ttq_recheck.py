"""The re-evaluation of a close time-to-quality verdict on more points (tiny made-up runs)."""

import importlib

import pytest
import torch
from benchload import load_benchmark

from flowlab.data import get_dataset
from flowlab.eval import heldout_points
from flowlab.models import FFJORD

recheck = load_benchmark("ttq_recheck.py", "ttq_recheck_under_test")
# the benchmark module as the script imports it (by name, from benchmarks/ on the path)
ttq = importlib.import_module("time_to_quality")
POINTS, SEED = 50, 11


def _cached_runs(tmp_path, offsets: dict[str, dict[int, float]]):
    """Runs whose cached log q is log p minus a known offset per run, plus a pattern that
    averages to zero over the points: each run's paired KL is exactly its offset."""
    data = get_dataset("8gaussians")
    log_p = data.log_prob(heldout_points(data, POINTS, seed=SEED)).double()
    wobble = torch.linspace(-1e-3, 1e-3, POINTS, dtype=torch.float64)
    runs = {}
    for method, by_seed in offsets.items():
        runs[method] = {}
        for seed, offset in by_seed.items():
            run = ttq.replicate_folder(tmp_path, "8gaussians", method, seed)
            run.mkdir(parents=True)
            torch.save({"log_q": log_p - offset - wobble, "snapshot": {}},
                       recheck.cache_path(run, POINTS, SEED))
            runs[method][seed] = run
    return runs


def test_the_report_gives_each_runs_kl_the_means_and_the_verdict(tmp_path):
    runs = _cached_runs(tmp_path, {"ffjord": {0: 0.0010, 1: 0.0020, 2: 0.0030},
                                   "cfm-avg-fourier-60s": {0: 0.0012, 1: 0.0016, 2: 0.0020},
                                   "cfm-avg-sob-fourier-ema-60s": {0: 0.0021, 1: 0.0023,
                                                                   2: 0.0025}})
    report = recheck.summarize(runs, "8gaussians", POINTS, SEED)
    # the wobble sums to zero: each KL is the offset, with an s.e. from the wobble alone
    se = float(torch.linspace(-1e-3, 1e-3, POINTS, dtype=torch.float64).std()) / POINTS ** 0.5
    assert f"0: 0.0010 ± {se:.4f}, 1: 0.0020 ± {se:.4f}, 2: 0.0030 ± {se:.4f}" in report
    assert "| ffjord |" in report and "| 0.0020 ± 0.0006 |" in report  # stdev 0.001 / sqrt 3
    assert "cfm-avg-fourier-60s against ffjord: -0.0004 ± 0.0006 nats over runs: reached" \
        in report
    assert "cfm-avg-sob-fourier-ema-60s against ffjord: +0.0003 ± 0.0006 nats over runs: " \
           "not reached" in report


def test_fewer_than_three_runs_give_the_kls_but_no_verdict(tmp_path):
    runs = _cached_runs(tmp_path, {"ffjord": {0: 0.0010, 1: 0.0020},
                                   "cfm-avg-fourier-60s": {0: 0.0012, 1: 0.0016}})
    report = recheck.summarize(runs, "8gaussians", POINTS, SEED)
    assert "| 0.0015 ± 0.0005 |" in report and "| 0.0014 ± 0.0002 |" in report
    assert "No verdict" in report and "against ffjord" not in report


def test_a_run_is_evaluated_once_exactly_and_cached_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = FFJORD(dim=2, hidden=(8,)).double().eval()
    calls = []

    def load(run, snapshot):
        calls.append(snapshot)
        return model

    monkeypatch.setattr(ttq, "_flowlab_model", load)
    monkeypatch.setattr(ttq, "_snapshot_index",
                        lambda run, method: [{"file": "t30.pt"}, {"file": "t60.pt"}])
    run = tmp_path / "run"
    run.mkdir()
    message = recheck.model_log_probs(run, "ffjord", "8gaussians", POINTS, SEED)
    assert "50 points" in message and calls == ["t60.pt"]  # the final snapshot
    cached = torch.load(recheck.cache_path(run, POINTS, SEED))["log_q"]
    x = heldout_points(get_dataset("8gaussians"), POINTS, seed=SEED)
    with torch.no_grad():
        expected = model.log_prob(x)
    torch.testing.assert_close(cached, expected.double(), rtol=1e-5, atol=1e-5)
    assert [p.name for p in run.iterdir()] == [recheck.cache_path(run, POINTS, SEED).name]
    assert recheck.model_log_probs(run, "ffjord", "8gaussians", POINTS, SEED).endswith("cached")
    assert calls == ["t60.pt"]
    # trained again (another final snapshot): evaluated anew, not read from the old cache
    monkeypatch.setattr(ttq, "_snapshot_index",
                        lambda run, method: [{"file": "t60.pt", "step": 4000}])
    assert "50 points" in recheck.model_log_probs(run, "ffjord", "8gaussians", POINTS, SEED)
    assert calls == ["t60.pt", "t60.pt"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ffjord,zuko"], "not zuko"),
    (["--methods", "ot-cfm-ml"], "not ot-cfm-ml"),
    (["--seeds", "one"], "--seeds takes whole numbers"),
    (["--points", "1"], "--points must be at least 2"),
    (["--seeds", "0,1"], "no finished run in"),
])
def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        recheck.main(["--runs", str(tmp_path), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
