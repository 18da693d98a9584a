"""Training that survives: checkpoints kept and rotated, resume after SIGKILL, SIGTERM, corrupt
checkpoints, a full disk, NaN losses and failed solves, bad data before anything is written."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowlab.errors import DataError, NonFiniteError, RunDirError, SolverError
from flowlab.models import FFJORD
from flowlab.ode import SolverConfig
from flowlab.train import TrainConfig, load_model, loop, train
from flowlab.train import checkpoint as ckpt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def blobs(n: int, gen: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    return sign * torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(n, 2, generator=gen)


def tiny(seed: int = 0) -> FFJORD:
    torch.manual_seed(seed)
    return FFJORD(2, hidden=(8, 8), solver=SolverConfig("rk4", steps=2), divergence="hutchinson")


def config(**kw) -> TrainConfig:
    base = dict(iters=12, batch_size=32, checkpoint_every_steps=3, log_every=1, val_every=0)
    return TrainConfig(**{**base, **kw})


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                   b.state_dict().values(), strict=True))


def log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / ckpt.LOG).read_text().splitlines()]


def reference(tmp_path: Path, **kw) -> FFJORD:
    model = tiny()
    train(model, blobs, config(**kw), tmp_path / "reference", progress=False)
    return model


# -- checkpoints -------------------------------------------------------------------------------
def test_checkpoints_rotate_and_keep_the_newest(tmp_path):
    train(tiny(), blobs, config(iters=10, keep_checkpoints=2), tmp_path, progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step-000000010.safetensors", "step-000000009.safetensors"]
    for path in ckpt.list_checkpoints(tmp_path):
        _, meta = ckpt.load_tensors(path)
        assert meta["step"] == int(path.name[5:14])
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    expected = reference(tmp_path)
    run = tmp_path / "run"

    def stop_at_7(record):
        if record["step"] == 7:
            raise KeyboardInterrupt

    train(tiny(), blobs, config(), run, progress=False, callback=stop_at_7)
    newest, previous = ckpt.list_checkpoints(run)[:2]  # steps 7 and 6
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a dying disk
    with pytest.warns(UserWarning, match="step-000000007.safetensors"):
        model = tiny(seed=5)
        result = train(model, blobs, config(), run, resume=True, progress=False)
    assert result.steps == 12
    assert (run / ckpt.CHECKPOINTS / (newest.name + ".corrupt")).is_file()  # kept for a look
    assert same_parameters(model, expected)  # resumed from step 6, same run
    assert log_steps(run) == list(range(1, 13))  # records after step 6 were dropped


def test_no_readable_checkpoint_is_a_clear_error_naming_each_file(tmp_path):
    train(tiny(), blobs, config(iters=6, keep_checkpoints=2), tmp_path, progress=False)
    for path in ckpt.list_checkpoints(tmp_path):
        path.write_bytes(b"\0" * 40)
    with pytest.raises(RunDirError, match="no readable checkpoint") as info:
        train(tiny(), blobs, config(iters=6), tmp_path, resume=True, progress=False)
    assert "step-000000006" in str(info.value) and "step-000000003" in str(info.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tiny(), blobs, config(iters=3), tmp_path, progress=False)
    other = FFJORD(2, hidden=(4,), solver=SolverConfig("rk4", steps=2))
    with pytest.raises(RunDirError, match="different model"):
        train(other, blobs, config(iters=6), tmp_path, resume=True, progress=False)


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_resume_never_unpickles_a_crafted_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run" / ckpt.CHECKPOINTS
    folder.mkdir(parents=True)
    (folder / "step-000000005.safetensors").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(RunDirError, match="not a readable safetensors file"):
        train(tiny(), blobs, config(), tmp_path / "run", resume=True, progress=False)
    assert not (tmp_path / "PWNED").exists()


def test_full_disk_is_a_clear_error_and_the_run_stays_resumable(tmp_path, monkeypatch):
    expected = reference(tmp_path)
    run = tmp_path / "run"
    real_save, calls = ckpt.save_tensors, []

    def save_until_full(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 4:  # checkpoints of steps 0, 3, 6 written; step 9 fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "save_tensors", save_until_full)
    with pytest.raises(RunDirError, match="No space left on device") as info:
        train(tiny(), blobs, config(), run, progress=False)
    assert "step-000000006.safetensors" in str(info.value)  # the last good one is named
    assert "--resume" in str(info.value)
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    model = tiny(seed=9)
    train(model, blobs, config(), run, resume=True, progress=False)
    assert same_parameters(model, expected)


def test_unwritable_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(RunDirError, match="cannot create the run folder"):
        train(tiny(), blobs, config(), tmp_path / "file" / "run", progress=False)


# -- bad data: refused before anything is written -----------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (lambda n, g: torch.empty(0, 2), "empty batch"),
    (lambda n, g: torch.randn(n, 3, generator=g), "shape"),
    (lambda n, g: torch.randint(0, 5, (n, 2), generator=g), "floating-point"),
    (lambda n, g: torch.full((n, 2), float("inf")), "NaN or Inf"),
    (lambda n, g: [[0.0, 1.0]] * n, "not a tensor"),
])
def test_bad_data_is_refused_before_the_run_folder_is_written(tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        train(tiny(), bad, config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# -- numerical faults ----------------------------------------------------------------------------
def _poison(monkeypatch, model, calls_that_fail, error=None):
    """Make ``model.training_loss`` fail on the given call numbers (from 0)."""
    real, count = model.training_loss, [0]

    def loss(*batch):
        out = real(*batch)
        call = count[0]
        count[0] += 1
        if call in calls_that_fail:
            if error is not None:
                raise error
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "training_loss", loss)


def test_nan_loss_restores_the_last_good_state_with_half_the_learning_rate(tmp_path,
                                                                          monkeypatch):
    model, lrs = tiny(), {}
    _poison(monkeypatch, model, {7})  # the 8th step (step 7) fails once
    with pytest.warns(UserWarning, match="step 7.*restored the state of step 6"):
        result = train(model, blobs, config(schedule="constant"), tmp_path, progress=False,
                       callback=lambda r: lrs.__setitem__(r["step"], r["lr"]))
    assert result.steps == 12
    assert [(r["step"], r["restored_step"]) for r in result.restores] == [(7, 6)]
    assert "training loss is nan" in result.restores[0]["error"]
    assert lrs[6] == pytest.approx(5e-3) and lrs[7] == pytest.approx(2.5e-3)
    assert log_steps(tmp_path) == list(range(1, 13))  # one record per step, no repeats
    _, meta = ckpt.load_tensors(ckpt.list_checkpoints(tmp_path)[0])
    assert meta["lr_scale"] == 0.5 and len(meta["restores"]) == 1  # survives a resume


def test_failed_solve_is_a_fault_too(tmp_path, monkeypatch):
    model = tiny()
    _poison(monkeypatch, model, {4}, SolverError("dopri5: step size underflow at t=0.31"))
    with pytest.warns(UserWarning, match="step 4: dopri5: step size underflow"):
        result = train(model, blobs, config(), tmp_path, progress=False)
    assert result.steps == 12 and result.restores[0]["restored_step"] == 3


def test_stop_policy_and_too_many_faults_raise_with_the_step(tmp_path, monkeypatch):
    model = tiny()
    _poison(monkeypatch, model, {5})
    with pytest.raises(NonFiniteError, match="step 5: the training loss is nan"):
        train(model, blobs, config(on_nonfinite="stop"), progress=False)

    model = tiny()
    _poison(monkeypatch, model, set(range(4, 100)))  # fails from step 4 on, whatever the lr
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="after 2 restore"):
        train(model, blobs, config(max_restores=2), tmp_path, progress=False)
    assert ckpt.list_checkpoints(tmp_path)[0].name == "step-000000003.safetensors"


def test_non_finite_last_good_state_stops_at_once():
    model = tiny()
    with torch.no_grad():
        model.blocks[0].field.layers[0].linear.weight[0, 0] = float("nan")
    with pytest.raises((NonFiniteError, SolverError), match="cannot help"):
        train(model, blobs, config(), progress=False)


# -- signals and SIGKILL --------------------------------------------------------------------------
def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-m", "flowlab.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = _cli("train", "--data", "moons", "--iters", "100000", "--hidden", "8",
                "--solver", "rk4", "--steps", "2", "--no-progress", "--out", str(run))
    deadline = time.monotonic() + 60
    while not ((run / ckpt.LOG).is_file() and (run / ckpt.LOG).stat().st_size):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in out and f"--resume {run}" in out
    path = ckpt.list_checkpoints(run)[0]
    _, meta = ckpt.load_tensors(path)
    assert meta["step"] >= 10  # the log had a record, so at least log_every steps ran
    assert load_model(run / ckpt.WEIGHTS).config()["hidden"] == [8]
    resumed = _cli("train", "--resume", str(run), "--iters", str(meta["step"] + 5),
                   "--no-progress")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"done: {meta['step'] + 5} steps" in out


def test_sigterm_during_a_validation_stops_within_one_chunk(tmp_path):
    """A stop signal that comes while the held-out points are being scored (by the ODE that
    can take minutes on images) is honoured after the chunk in progress: the rest of the
    validation is dropped, nothing half-scored is logged, and the run stops at that step."""
    model = tiny()
    scored = []
    log_prob = model.log_prob

    def signalling_log_prob(x, **kwargs):
        if not model.training:  # the validation, not the training loss
            scored.append(len(x))
            if len(scored) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return log_prob(x, **kwargs)

    model.log_prob = signalling_log_prob
    val = blobs(5 * 32, torch.Generator().manual_seed(3))
    result = train(model, blobs, config(iters=12, val_every=2), tmp_path, progress=False,
                   val_points=val)
    assert result.stopped_by == "SIGTERM"
    assert scored == [32]  # one chunk of batch_size points of the five, then abandoned
    assert result.steps == 6  # the first validation mark is half way through the 12 steps
    assert log_steps(tmp_path) == list(range(1, 7))
    records = [json.loads(line) for line in (tmp_path / ckpt.LOG).read_text().splitlines()]
    assert not any("val_nll" in r for r in records)
    assert ckpt.load_tensors(ckpt.list_checkpoints(tmp_path)[0])[1]["step"] == 6


def test_validation_scores_in_chunks_and_agrees_with_one_pass():
    from flowlab.train.loop import validation_nll

    model = tiny()
    val = blobs(100, torch.Generator().manual_seed(4))
    whole, chunked = validation_nll(model, val), validation_nll(model, val, batch_size=32)
    assert chunked == pytest.approx(whole, rel=1e-5)  # a fixed-step solver: same numbers
    assert validation_nll(model, val, batch_size=32, stop=lambda: True) is None


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path):
    """Kill a training process 20 times at random instants (checkpoint every step), resuming
    each time: every checkpoint loads, the log has each step once, and the final parameters
    equal those of a run never interrupted."""
    run, ref = tmp_path / "run", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, str(HERE / "fault_zygote.py"), str(run), str(ref),
                           "20", "0"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert len(report["killed_at"]) == 20
    mid_run = [k for k in report["killed_at"] if k is not None]
    assert len(mid_run) >= 15, report  # most kills landed while training was under way
    assert len(set(mid_run)) >= 10, report  # at different points of the run
    for path in ckpt.list_checkpoints(run):
        ckpt.load_tensors(path)
    assert not list(run.rglob("*.tmp"))
    steps = log_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == 400
    final, expected = load_model(run / ckpt.WEIGHTS), load_model(ref / ckpt.WEIGHTS)
    assert same_parameters(final, expected)


def test_interrupt_inside_an_update_saves_a_consistent_state(tmp_path, monkeypatch):
    expected = reference(tmp_path)
    run = tmp_path / "run"
    real_step, count = torch.optim.AdamW.step, [0]

    def step_then_interrupt(self, *a, **kw):
        out = real_step(self, *a, **kw)
        count[0] += 1
        if count[0] == 5:  # parameters moved, step counter not yet
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    result = train(tiny(), blobs, config(), run, progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert result.stopped_by == "SIGINT" and result.steps == 3  # back to the last good state
    model = tiny(seed=4)
    train(model, blobs, config(), run, resume=True, progress=False)
    assert same_parameters(model, expected)


def test_payload_restores_every_random_state():
    import random

    import numpy as np

    model = tiny()
    optimizer = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(3)
    payload = loop._payload(model, optimizer, gen, None, 0, 0.0, 1.0, [])
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())),
                float(torch.rand((), generator=gen)))
    loop._apply_payload(*payload, "test", model, optimizer, gen, None)
    again = (random.random(), float(np.random.rand()), float(torch.rand(())),
             float(torch.rand((), generator=gen)))
    assert again == expected
