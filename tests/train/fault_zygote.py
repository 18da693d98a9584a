"""Fault injection for tests/train/test_faults.py: training killed with SIGKILL, then resumed.

Run as ``python fault_zygote.py RUN_DIR REFERENCE_DIR KILLS SEED``. The process imports torch
once and forks the training children from it (a fresh interpreter per resume would spend the
time budget on imports). Each child resumes from the newest checkpoint, or starts, and is
killed with SIGKILL after a random delay; after KILLS kills a last child trains to the end.
The uninterrupted reference run is trained first, in this process: that also warms up the
lazy imports and initializations (about 1.5 s) that each child would otherwise repeat. Prints
one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from flowlab.models import FFJORD  # noqa: E402
from flowlab.ode import SolverConfig  # noqa: E402
from flowlab.train import TrainConfig, train  # noqa: E402
from flowlab.train.checkpoint import list_checkpoints  # noqa: E402

ITERS = 400


def sampler(n: int, gen: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    return sign * torch.tensor([2.0, 1.0]) + 0.3 * torch.randn(n, 2, generator=gen)


def work(run_dir: Path) -> None:
    torch.manual_seed(0)
    # Hutchinson probes draw from the global RNG: the resume must restore it exactly.
    model = FFJORD(2, hidden=(16, 16), solver=SolverConfig("rk4", steps=2),
                   divergence="hutchinson")
    config = TrainConfig(iters=ITERS, batch_size=32, checkpoint_every_steps=1,
                         keep_checkpoints=2, log_every=1, val_every=0, seed=0)
    train(model, sampler, config, run_dir, resume=bool(list_checkpoints(run_dir)),
          progress=False)


def in_child(run_dir: Path) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            work(run_dir)
        except BaseException as err:  # report, never return into the parent's code
            print(f"child failed: {err!r}", file=sys.stderr, flush=True)
            code = 1
        finally:
            os._exit(code)
    return pid


def main() -> None:
    run_dir, reference_dir = Path(sys.argv[1]), Path(sys.argv[2])
    kills, rng = int(sys.argv[3]), random.Random(int(sys.argv[4]))
    started = time.perf_counter()
    work(reference_dir)
    killed_at = []
    for _ in range(kills):
        pid = in_child(run_dir)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        finished = os.waitstatus_to_exitcode(status) == 0
        newest = list_checkpoints(run_dir)
        killed_at.append(None if finished or not newest else newest[0].name)
    _, status = os.waitpid(in_child(run_dir), 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the final resumed run failed"
    print(json.dumps({"killed_at": killed_at, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
