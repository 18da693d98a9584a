import importlib.util
import json
import math

import pytest
import torch
from benchload import load_benchmark

from flowlab.data import get_dataset
from flowlab.errors import NonFiniteError, RunDirError
from flowlab.eval.nll import evaluate_nll, heldout_points
from flowlab.models import build_model
from flowlab.train import TrainConfig
from flowlab.train import train as flowlab_train

fp = load_benchmark("peers/flow_peers.py", "flow_peers_under_test")


def _peer(name: str) -> str:
    pytest.importorskip(name.split("-")[0])
    return name


ALL = [pytest.param(name, id=name) for name in fp.PEERS]


def _flowlab_batches_and_rates(dataset_name: str, iters: int, batch_size: int, seed: int):
    """The batches that flowlab's loop trains on (as training_loss receives them) and the
    learning rate of each step."""
    dataset = get_dataset(dataset_name)
    model = build_model("maf", dim=2, hidden=(8,), num_blocks=1)
    batches, rates = [], []
    loss = model.training_loss

    def recording_loss(x, context=None):
        batches.append(x.detach().clone())
        return loss(x, context)

    model.training_loss = recording_loss
    flowlab_train(model, lambda n, g: dataset.sample(n, generator=g),
                  TrainConfig(iters=iters, batch_size=batch_size, seed=seed, log_every=1),
                  progress=False, callback=lambda record: rates.append(record["lr"]))
    return batches, rates


@pytest.mark.parametrize("name", ALL)
def test_peer_sees_flowlabs_batches_and_learning_rates(name, tmp_path):
    name = _peer(name)
    expected_batches, expected_rates = _flowlab_batches_and_rates("moons", 4, 32, seed=5)
    batches, rates = [], []
    result = fp.train(name, "moons", tmp_path / "run", iters=4, batch_size=32, seed=5,
                      log_every=1,
                      callback=lambda record, batch: (batches.append(batch.clone()),
                                                      rates.append(record["lr"])))
    assert result["steps"] == 4 and len(batches) == len(expected_batches) == 4
    for ours, theirs in zip(batches, expected_batches, strict=True):
        assert torch.equal(ours, theirs)
    assert rates == pytest.approx(expected_rates, rel=1e-12)
    assert rates[0] == pytest.approx(5e-3) and rates[-1] < rates[0]  # cosine from flowlab's lr


@pytest.mark.parametrize("name", ALL)
def test_trained_peer_density_integrates_to_one(name, tmp_path):
    name = _peer(name)
    result = fp.train(name, "8gaussians", tmp_path / "run", iters=25, batch_size=256)
    model = fp.load_peer(tmp_path / "run").double()
    # early in training zuko's MAF has heavy tails (samples beyond 100): a wide window
    h = 0.1
    axis = torch.arange(-25.0, 25.0 + h / 2, h, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        density = torch.cat([model.log_prob(c) for c in grid.split(100_000)]).exp()
    assert float(density.sum()) * h * h == pytest.approx(1.0, abs=1e-2)
    # trained: no longer the standard normal it started as
    base = (-0.5 * grid.pow(2).sum(-1) - math.log(2 * math.pi)).exp()
    assert 0.5 * float((density - base).abs().sum()) * h * h > 0.1
    assert result["steps"] == 25


def test_run_folder_reloads_to_the_trained_flow_and_evaluates_like_flowlab(tmp_path):
    name = _peer("zuko-nsf")
    result = fp.train(name, "moons", tmp_path / "run", iters=3, batch_size=64, log_every=2)
    out = tmp_path / "run"
    config = json.loads((out / fp.CONFIG).read_text())
    assert config["peer"] == name and config["dataset"] == "moons"
    assert config["train"]["lr"] == 5e-3 and config["train"]["schedule"] == "cosine"
    assert config["parameters"] == result["model"].num_parameters()
    log = [json.loads(line) for line in (out / fp.LOG).read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3]  # every log_every steps, and the last one
    assert fp.final_step(out) == (3, pytest.approx(result["seconds"], abs=1e-3))
    loaded = fp.load_peer(out)
    x = torch.randn(50, 2)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), result["model"].eval().log_prob(x))
    assert loaded.sample((7,)).shape == (7, 2)
    report = fp.evaluate(loaded, "moons", n_test=500)
    dataset = get_dataset("moons")
    direct = evaluate_nll(loaded.double(), heldout_points(dataset, 500),
                          entropy=dataset.entropy, reference=dataset)
    assert report["nll_nats"] == pytest.approx(direct.nll_nats, abs=1e-12)
    assert report["kl_nats"] == pytest.approx(direct.kl_nats, abs=1e-12)
    assert report["gap_nats"] == pytest.approx(direct.nll_nats - dataset.entropy, abs=1e-12)
    with pytest.raises(RunDirError, match="not empty"):
        fp.train(name, "moons", out, iters=1)


def test_a_non_finite_loss_stops_with_the_step(tmp_path, monkeypatch):
    name = _peer("nflows-maf")
    log_prob = fp.PeerFlow.log_prob
    monkeypatch.setattr(fp.PeerFlow, "log_prob", lambda self, x: log_prob(self, x) * math.nan)
    with pytest.raises(NonFiniteError, match="step 0"):
        fp.train(name, "moons", tmp_path / "run", iters=3, batch_size=16)


def test_peer_sizes_match_flowlabs_defaults():
    for peer, family in (("zuko-maf", "maf"), ("nflows-maf", "maf"), ("zuko-nsf", "nsf-ar"),
                         ("nflows-nsf", "nsf-ar")):
        if importlib.util.find_spec(peer.split("-")[0]) is None:
            continue
        assert fp.build_peer(peer).num_parameters() == \
            build_model(family, dim=2).num_parameters()
