"""Training under torchrun with DistributedDataParallel: two CPU processes (gloo) with batch B
each train exactly like one process with batch 2B; resume continues every rank's stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flowlab.cli import main
from flowlab.train import checkpoint as ckpt
from flowlab.train import load_model
from flowlab.train.distributed import Context

REPO = Path(__file__).resolve().parent.parent.parent
SMALL = ["--data", "moons", "--hidden", "16,16", "--solver", "rk4", "--steps", "4",
         "--no-progress", "--seed", "3"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def torchrun(*args: str, nproc: int = 2, command: str = "train") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", "-m", "flowlab.cli", command, *args],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return load_model(run / ckpt.WEIGHTS).state_dict()


COUPLING = ["--data", "moons", "--model", "realnvp", "--num-blocks", "3", "--hidden", "16,16",
            "--no-progress", "--seed", "3"]


@pytest.mark.parametrize("model", [SMALL, COUPLING], ids=["ffjord", "realnvp"])
def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(tmp_path, model):
    """For the CNF and for a coupling flow."""
    out = torchrun(*model, "--iters", "8", "--batch-size", "32", "--out", str(tmp_path / "ddp"))
    assert out.stdout.count("training ") == 1  # only rank 0 speaks
    assert "2 processes" in out.stdout
    single_run = ["train", *model, "--iters", "8", "--batch-size", "64", "--out",
                  str(tmp_path / "single")]
    assert main(single_run) == 0
    ddp, single = parameters(tmp_path / "ddp"), parameters(tmp_path / "single")
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # and the runs did train: the weights are not the initial ones
    torch.manual_seed(3)
    from flowlab.models import build_model

    config = ckpt.read_run_config(tmp_path / "single")
    initial = build_model(config["model"], **config["model_options"]).state_dict()
    assert any(not torch.allclose(initial[k], single[k]) for k in single)
    # one writer: each log record once
    steps = [line for line in (tmp_path / "ddp" / ckpt.LOG).read_text().splitlines()]
    assert len(steps) == len(set(steps))


def test_resumed_two_rank_run_continues_every_rank_stream(tmp_path):
    """Flow matching draws times and noise from each rank's own RNG: a resume must restore the
    random state of both ranks to continue exactly (constant learning rate, so that the
    shorter first budget does not change the schedule)."""
    cfm = ["--model", "cfm", *SMALL, "--batch-size", "32", "--schedule", "constant"]
    torchrun(*cfm, "--iters", "6", "--out", str(tmp_path / "straight"))
    torchrun(*cfm, "--iters", "3", "--out", str(tmp_path / "resumed"))
    _, meta = ckpt.load_tensors(ckpt.list_checkpoints(tmp_path / "resumed")[0])
    assert meta["world_size"] == 2 and set(meta["rng"]) == {"0", "1"}
    torchrun("--resume", str(tmp_path / "resumed"), "--iters", "6", "--no-progress")
    straight, resumed = parameters(tmp_path / "straight"), parameters(tmp_path / "resumed")
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    run = tmp_path / "run"
    torchrun("--model", "cfm", *SMALL, "--iters", "2", "--batch-size", "16", "--out", str(run))
    code = main(["train", "--resume", str(run), "--iters", "4", "--no-progress"])
    assert code == 2


def test_shard_takes_each_rank_its_own_rows():
    batch = torch.arange(12).reshape(6, 2)
    rows = [Context(rank=r, world_size=3).shard(batch) for r in range(3)]
    assert torch.equal(torch.cat(rows), batch)
    assert all(len(r) == 2 for r in rows)


def test_sharded_evaluation_equals_the_single_process_one(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *SMALL, "--iters", "3", "--batch-size", "32", "--out", str(run)]) == 0
    evaluate = ["--n-test", "301", "--solver", "rk4", "--steps", "4"]  # odd: uneven shards
    assert main(["eval", str(run), *evaluate]) == 0
    single = json.loads((run / "eval.json").read_text())
    torchrun(str(run), *evaluate, command="eval")
    sharded = json.loads((run / "eval.json").read_text())
    assert sharded["processes"] == 2 and sharded["n_test"] == 301
    for key in ("nll_nats", "nll_se", "kl_nats", "kl_se"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-12), key


def test_data_dependent_initialization_is_the_same_on_every_rank(tmp_path):
    """Glow's ActNorm is initialized from the first global batch (not each rank's slice), so
    the step-0 state equals the single process's. (Later steps are not compared: right after
    that initialization the ActNorm gradients are zero up to rounding, and Adam turns rounding
    noise into full-size steps.)"""
    glow = ["--data", "moons", "--model", "glow", "--num-blocks", "2", "--hidden", "16",
            "--no-progress", "--seed", "3", "--iters", "1"]
    torchrun(*glow, "--batch-size", "32", "--out", str(tmp_path / "ddp"))
    assert main(["train", *glow, "--batch-size", "64", "--out", str(tmp_path / "single")]) == 0
    ddp, _ = ckpt.load_tensors(ckpt.checkpoint_path(tmp_path / "ddp", 0))
    single, _ = ckpt.load_tensors(ckpt.checkpoint_path(tmp_path / "single", 0))
    actnorm = [k for k in single if k.endswith(".log_scale")]
    assert actnorm and all(single[k].abs().sum() > 0 for k in actnorm)  # initialized
    for key in (k for k in single if k.startswith("model.")):
        assert torch.equal(ddp[key], single[key]), key
