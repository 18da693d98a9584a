import json
import math
import pickle

import pytest
import torch

from flowlab.errors import ConfigError, NonFiniteError, RunDirError
from flowlab.models import FFJORD, build_model
from flowlab.ode import SolverConfig
from flowlab.train import TrainConfig, learning_rate, load_model, save_model, train
from flowlab.train import checkpoint as ckpt


def blob_sampler(n: int, gen: torch.Generator) -> torch.Tensor:
    """Two separated Gaussian blobs: far from the standard-normal base."""
    sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    return sign * torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(n, 2, generator=gen)


def small_model(**kw) -> FFJORD:
    kw.setdefault("solver", SolverConfig("rk4", steps=4))
    return FFJORD(2, hidden=(16, 16), **kw)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"iters": 0}, {"seconds": -1.0}, {"iters": 5, "batch_size": 0},
     {"iters": 5, "lr": float("nan")}, {"iters": 5, "schedule": "linear"}],
)
def test_train_config_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_cosine_schedule_endpoints_and_warmup():
    config = TrainConfig(iters=100, lr=1e-2, lr_min_ratio=0.1, warmup=10)
    assert learning_rate(config, 50, 0.0) == pytest.approx(1e-2)
    assert learning_rate(config, 50, 0.5) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))
    assert learning_rate(config, 99, 1.0) == pytest.approx(1e-3)
    assert learning_rate(config, 0, 0.0) == pytest.approx(1e-3)  # 1/10 of warm-up
    constant = TrainConfig(iters=100, lr=1e-2, schedule="constant")
    assert learning_rate(constant, 80, 0.8) == pytest.approx(1e-2)


def test_training_lowers_nll_and_writes_run_folder(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    val = blob_sampler(500, torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        before = float(-model.log_prob(val).mean())
    result = train(model, blob_sampler, TrainConfig(iters=120, batch_size=256, lr=5e-3,
                                                    log_every=20), tmp_path, progress=False)
    model.eval()
    with torch.no_grad():
        after = float(-model.log_prob(val).mean())
    assert result.steps == 120
    assert after < before - 0.5, (before, after)
    for name in (ckpt.LOG, ckpt.WEIGHTS):
        assert (tmp_path / name).is_file()
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.checkpoint_path(tmp_path, s)
                                               for s in (120, 0)]  # the end and the start
    lines = (tmp_path / ckpt.LOG).read_text().splitlines()
    assert len(lines) == 6
    assert "nfe_forward" in lines[-1] and "seconds" in lines[-1]


MODELS = {
    # Hutchinson probes make the RNG state matter
    "ffjord": lambda: small_model(divergence="hutchinson"),
    # a coupling flow with batch norm (running statistics are state too) and ActNorm
    "realnvp": lambda: build_model("realnvp", dim=2, num_blocks=3, hidden=[16], batch_norm=True),
    "glow": lambda: build_model("glow", dim=2, num_blocks=2, hidden=[16]),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_resume_reproduces_uninterrupted_run(tmp_path, name):
    config = TrainConfig(iters=40, batch_size=64, lr=5e-3, log_every=1, seed=3)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / ckpt.LOG).read_text().splitlines()]

    torch.manual_seed(3)
    reference = MODELS[name]()
    train(reference, blob_sampler, config, tmp_path / "a", progress=False)

    def interrupt(record):
        if record["step"] == 17:
            raise KeyboardInterrupt

    torch.manual_seed(3)
    first = MODELS[name]()
    result = train(first, blob_sampler, config, tmp_path / "b", progress=False, callback=interrupt)
    assert result.stopped_by == "SIGINT" and result.steps == 17
    torch.manual_seed(123)  # a different global RNG state: the checkpoint must restore it
    resumed = MODELS[name]()
    result = train(resumed, blob_sampler, config, tmp_path / "b", resume=True, progress=False)
    assert result.steps == 40
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # every step's loss, exactly
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key


def test_nan_loss_is_reported_with_step():
    model = small_model()

    def poisoned(n, gen):
        x = blob_sampler(n, gen)
        x[0, 0] = float("nan")
        return x

    # a NaN in the data is caught by the model's input check before any solve
    with pytest.raises(Exception, match="NaN"):
        train(model, poisoned, TrainConfig(iters=3), progress=False)

    # a NaN produced inside the model is reported by the loop with the step number
    model = small_model()
    with torch.no_grad():
        model.blocks[0].field.layers[0].linear.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 0"):
        train(model, blob_sampler, TrainConfig(iters=3), progress=False)


def test_model_file_round_trip(tmp_path):
    model = small_model(num_blocks=2, kinetic=0.1)
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    loaded = load_model(path)
    assert loaded.config() == model.config()
    x = torch.randn(10, 2)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), loaded.log_prob(x))


def test_corrupt_and_truncated_files_get_clear_errors(tmp_path):
    model = small_model()
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="trunc.safetensors"):
        load_model(tmp_path / "trunc.safetensors")
    with pytest.raises(RunDirError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    # wrong version in the metadata
    tensors, meta = ckpt.load_tensors(path)
    ckpt.save_tensors(tmp_path / "old.safetensors", tensors, {**meta, "format_version": 0})
    with pytest.raises(RunDirError, match="incompatible"):
        load_model(tmp_path / "old.safetensors")


def test_format_1_files_load_unless_they_hold_maf_layers(tmp_path):
    """Format 2 changed only the map of the masked affine autoregressive layers: a format-1
    file of another model still loads; one holding MAF or IAF layers is refused, as a file
    and as a checkpoint to resume, instead of being silently misread."""
    def as_format_1(model, name):
        save_model(tmp_path / name, model)
        tensors, meta = ckpt.load_tensors(tmp_path / name)
        ckpt.save_tensors(tmp_path / name, tensors, {**meta, "format_version": 1})
        return tmp_path / name

    glow = build_model("glow", dim=2, num_blocks=2, hidden=[16])
    loaded = load_model(as_format_1(glow, "glow.safetensors"))
    x = torch.randn(5, 2)
    torch.testing.assert_close(loaded.log_prob(x), glow.log_prob(x))
    for family in ("maf", "iaf"):
        with pytest.raises(RunDirError, match=r"format 1.*misread.*Retrain"):
            load_model(as_format_1(build_model(family, dim=2), f"{family}.safetensors"))
    config = TrainConfig(iters=6, batch_size=32, checkpoint_every_steps=3, seed=0)
    train(build_model("maf", dim=2), blob_sampler, config, tmp_path / "run", progress=False)
    for path in ckpt.list_checkpoints(tmp_path / "run"):
        tensors, meta = ckpt.load_tensors(path)
        ckpt.save_tensors(path, tensors, {**meta, "format_version": 1})
    with pytest.raises(RunDirError, match="format 1"):
        train(build_model("maf", dim=2), blob_sampler, TrainConfig(iters=12, batch_size=32,
              checkpoint_every_steps=3, seed=0), tmp_path / "run", resume=True, progress=False)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = tmp_path / "model.safetensors"
    payload.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(RunDirError):
        load_model(payload)
    assert not (tmp_path / "PWNED").exists()


def test_build_model_rejects_unknown_name():
    with pytest.raises(ConfigError, match="ffjord"):
        build_model("nope")


def test_log_records_are_finite_numbers(tmp_path):
    import json

    train(small_model(), blob_sampler, TrainConfig(iters=10, log_every=2), tmp_path,
          progress=False)
    for line in (tmp_path / ckpt.LOG).read_text().splitlines():
        record = json.loads(line)
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float))


def test_atomic_write_leaves_no_temporary_files_and_usual_mode(tmp_path):
    import os
    import stat

    ckpt.atomic_write_json(tmp_path / "a.json", {"x": 1})
    ckpt.atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask


def test_weight_average_is_the_exponential_average_of_the_steps(tmp_path):
    """EMA against a hand-run average of every step's parameters, warm-up included."""
    torch.manual_seed(0)
    model = small_model()
    history = [{n: p.detach().clone() for n, p in model.named_parameters()}]

    def record(_):
        history.append({n: p.detach().clone() for n, p in model.named_parameters()})

    config = TrainConfig(iters=12, batch_size=32, ema=0.9, lr=1e-2)
    # the callback sees the raw weights after each step
    train(model, blob_sampler, config, tmp_path, progress=False, callback=record)
    expected = dict(history[0])
    for step, params in enumerate(history[1:]):
        decay = min(0.9, (1 + step) / (10 + step))
        expected = {n: decay * expected[n] + (1 - decay) * params[n] for n in expected}
    for name, param in model.named_parameters():  # the trained model holds the average
        torch.testing.assert_close(param.detach(), expected[name], atol=1e-6, rtol=1e-5)
    saved = load_model(tmp_path / ckpt.WEIGHTS)
    for (name, a), b in zip(saved.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(expected["blocks.0.sqrt_T"], history[-1]["blocks.0.sqrt_T"])


def test_resume_with_ema_reproduces_uninterrupted_run(tmp_path):
    config = TrainConfig(iters=20, batch_size=32, lr=5e-3, ema=0.95, seed=2)
    torch.manual_seed(2)
    reference = small_model()
    train(reference, blob_sampler, config, tmp_path / "a", progress=False)

    def interrupt(record):
        if record["step"] == 9:
            raise KeyboardInterrupt

    torch.manual_seed(2)
    train(small_model(), blob_sampler, config, tmp_path / "b", progress=False,
          callback=interrupt)
    resumed = small_model()
    train(resumed, blob_sampler, config, tmp_path / "b", resume=True, progress=False)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_snapshots_are_saved_at_the_training_times(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    clock = {"steps": []}

    def record(r):
        clock["steps"].append((r["step"], r["seconds"]))

    train(model, blob_sampler, TrainConfig(seconds=0.6, batch_size=32,
                                           snapshot_at=(0.2, 0.4, 5.0)),
          tmp_path, progress=False, callback=record)
    index = json.loads((tmp_path / "snapshots" / "snapshots.json").read_text())
    assert [e["at"] for e in index] == [0.2, 0.4]  # 5 s lies beyond the budget
    times = dict([(0, 0.0), *clock["steps"]])  # step -> clock (logged rounded to 1 ms)
    for entry in index:
        # the first step whose clock reached the mark, no earlier and no later
        step = entry["step"]
        assert entry["seconds"] >= entry["at"]
        assert times[step] >= entry["at"] - 5e-4 and times[step - 1] < entry["at"] + 5e-4
        assert (tmp_path / "snapshots" / entry["file"]).is_file()
    early = load_model(tmp_path / "snapshots" / index[0]["file"])
    assert any(not torch.equal(a, b) for a, b in zip(early.parameters(), model.parameters(),
                                                      strict=True))
    with pytest.raises(ConfigError, match="snapshot"):
        TrainConfig(iters=3, snapshot_at=(0.0,))
    with pytest.raises(ConfigError, match="ema"):
        TrainConfig(iters=3, ema=1.0)


def test_pair_sampler_batches_reach_the_loss(tmp_path):
    """A sampler may return a tuple (rectified flow's pairs); each tensor reaches the loss."""
    from flowlab.models import CFM

    seen = []

    class Spy(CFM):
        def training_loss(self, x, z=None):
            seen.append((x.shape, None if z is None else z.shape))
            return super().training_loss(x, z)

    model = Spy(2, hidden=(8,))
    train(model, lambda n, g: (torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)),
          TrainConfig(iters=3, batch_size=16), progress=False)
    assert seen == [(torch.Size([16, 2]), torch.Size([16, 2]))] * 3


def _clusters(n: int, gen: torch.Generator, width: float) -> torch.Tensor:
    centres = torch.tensor([[2.0, 1.0], [-2.0, 0.4], [0.6, -2.4], [-0.8, 2.2]])
    return centres[torch.randint(0, 4, (n,), generator=gen)] + width * torch.randn(
        n, 2, generator=gen)


def _memorize_sampler(n: int, gen: torch.Generator) -> torch.Tensor:
    """Four clusters far narrower than the validation data's: a flow first learns where they
    are (validation improves), then sharpens onto them (validation turns worse)."""
    return _clusters(n, gen, 0.02)


def _keep_best_run(run, callback=None, resume=False):
    config = TrainConfig(iters=150, batch_size=64, lr=1e-3, log_every=1, val_every=30,
                         keep_best=True, seed=5)
    val = _clusters(400, torch.Generator().manual_seed(9), 0.3)
    torch.manual_seed(5)
    model = build_model("maf", dim=2)
    result = train(model, _memorize_sampler, config, run, progress=False, val_points=val,
                   callback=callback, resume=resume)
    return model, result, val


def test_keep_best_returns_and_saves_the_best_validation_weights(tmp_path):
    from flowlab.train.loop import validation_nll

    model, result, val = _keep_best_run(tmp_path)
    records = [json.loads(line) for line in (tmp_path / ckpt.LOG).read_text().splitlines()]
    vals = {r["step"]: r["val_nll"] for r in records if "val_nll" in r}
    assert len(vals) == 30
    best_step = min(vals, key=vals.get)
    # the point of the test: validation got worse after the best step
    assert min(vals) < best_step < result.steps, vals  # validation improved, then worsened
    assert vals[result.steps] > vals[best_step] + 0.1 < vals[min(vals)], vals
    assert result.best["step"] == best_step
    assert result.best["val_nll"] == vals[best_step]
    assert validation_nll(model, val) == pytest.approx(vals[best_step], rel=1e-6)
    saved, best_file = load_model(tmp_path / ckpt.WEIGHTS), load_model(tmp_path / ckpt.BEST)
    for (key, a), b, c in zip(model.state_dict().items(), saved.state_dict().values(),
                              best_file.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), key


def test_keep_best_survives_resume(tmp_path):
    reference, ref_result, _ = _keep_best_run(tmp_path / "a")

    def interrupt(record):
        if record["step"] == ref_result.best["step"] + 7:
            raise KeyboardInterrupt

    _, first, _ = _keep_best_run(tmp_path / "b", callback=interrupt)
    def same(a, b):  # the clock differs from run to run
        return (a["step"], a["val_nll"]) == (b["step"], b["val_nll"])

    assert first.stopped_by == "SIGINT" and same(first.best, ref_result.best)
    resumed, result, _ = _keep_best_run(tmp_path / "b", resume=True)
    assert same(result.best, ref_result.best) and result.steps == 150
    for (key, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    (tmp_path / "b" / ckpt.BEST).unlink()
    with pytest.raises(RunDirError, match="best.safetensors is missing"):
        _keep_best_run(tmp_path / "b", resume=True)


def test_keep_best_needs_validation():
    with pytest.raises(ConfigError, match="val_every"):
        TrainConfig(iters=5, keep_best=True, val_every=0)
    with pytest.raises(ConfigError, match="val_points"):
        train(small_model(), blob_sampler, TrainConfig(iters=5, keep_best=True),
              progress=False)


def test_spike_watch_flags_a_jump_and_nothing_in_stationary_or_falling_losses():
    from flowlab.train.loop import SpikeWatch

    gen = torch.Generator().manual_seed(0)
    watch = SpikeWatch()
    noise = (3.0 + 0.1 * torch.randn(20000, generator=gen)).tolist()
    assert [z for z in map(watch, noise) if z is not None] == []
    # 30 moving s.d. above: flagged, with its distance; and kept out of the averages, so a run
    # stuck up there keeps being flagged
    for _ in range(50):
        z = watch(3.0 + 3.0)
        assert z is not None and 25 < z < 35, z
    assert watch.mean == pytest.approx(3.0, abs=0.01)
    # a falling loss, however fast, is progress
    falling = SpikeWatch()
    assert all(falling(1000.0 * 0.97 ** k) is None for k in range(500))


def test_a_loss_spike_in_training_is_warned_of_and_logged(tmp_path):
    """A finite jump of the loss (the data suddenly thirty times wider) is no fault for
    on_nonfinite, but the loop says so with the step and the fix, and marks it in the log."""

    def widening(n, gen):
        x = blob_sampler(n, gen)
        widening.calls += 1
        return x * 30 if widening.calls > 151 else x  # the first batch is drawn twice

    widening.calls = 0
    torch.manual_seed(0)
    model = build_model("maf", dim=2)
    config = TrainConfig(iters=160, batch_size=64, lr=1e-3, log_every=1, val_every=0)
    with pytest.warns(UserWarning, match=r"step 151: the training loss .* s\.d\. above its "
                                         r"recent mean .*--grad-clip"):
        train(model, widening, config, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / ckpt.LOG).read_text().splitlines()]
    flagged = [r["step"] for r in records if "loss_spike" in r]
    assert flagged == list(range(151, 161)), flagged


def test_validation_of_fixed_step_training_uses_the_adaptive_evaluation_solver():
    """Maximum likelihood with rk4 at few steps can game the discretized likelihood; a
    validation by that same discretization would reward it, so the exact one is used."""
    from flowlab.train.loop import validation_nll

    torch.manual_seed(0)
    model = FFJORD(2, hidden=(16, 16), T=1.0, solver=SolverConfig("rk4", steps=1),
                   eval_solver=SolverConfig(atol=1e-7, rtol=1e-7)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a field curved enough for one rk4 step to be visibly wrong
    val = torch.randn(200, 2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        exact = -model.log_prob(val).mean().item()
        discretized = -model.log_prob(val, solver=model.solver).mean().item()
    model.train()
    assert abs(discretized - exact) > 0.01, (discretized, exact)  # the test can tell them apart
    assert validation_nll(model, val) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert model.training  # validation restores the mode
