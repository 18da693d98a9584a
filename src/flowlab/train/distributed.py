"""Training on several processes with PyTorch's own engine (torch.distributed + DDP).

Start any ``flowlab train`` command under ``torchrun``; each process then trains one replica
of the model wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, whose gradients
are averaged over the processes at every step (gloo backend on CPU, nccl on GPUs).

How the work is split, so that N processes with ``--batch-size B`` train exactly like one
process with batch ``N * B``:

- every process draws the same global batch of ``N * B`` points from the same data stream and
  keeps its own slice of ``B`` (rank r keeps rows ``r*B .. (r+1)*B``), so the ranks see
  different data and a resumed run continues the same stream;
- every process builds the model from the same seed (DDP also broadcasts rank 0's weights);
  the global torch RNG (Hutchinson probes, flow-matching times and noise) is seeded per rank
  after that, so ranks do not draw the same noise;
- only rank 0 writes the run folder (log, checkpoints, snapshots, model); a checkpoint holds
  the random states of every rank, and resuming needs the same number of processes;
- the training clock and the stop signals are agreed on every step (the slowest clock), so all
  ranks stop, checkpoint and change learning rate at the same step;
- validation is sharded over the ranks and the sums reduced.

One exception to "exactly like one process": batch normalization (``realnvp``/``maf`` with
``batch_norm``) normalizes by each rank's own slice in training mode, and its running
averages are rank 0's (DDP broadcasts buffers), as with PyTorch's plain ``BatchNorm`` under
DDP. Data-dependent initialization (ActNorm) uses the whole first global batch on every rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flowlab.errors import ConfigError

RANK_SEED_STRIDE = 1_000_003  # global-RNG seed offset between ranks (a prime)


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, number of processes, local rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch of ``world_size * B`` rows."""
        size = batch.shape[0] // self.world_size
        return batch[self.rank * size:(self.rank + 1) * size]

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=_device())
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Elementwise maximum of ``values`` over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def sum(self, values: list[float]) -> list[float]:
        """Elementwise sum of ``values`` over the ranks."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (every rank gets the list)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def context() -> Context:
    """The process group this process belongs to (a single process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(backend: str | None = None) -> Context:
    """Join the process group that ``torchrun`` describes in the environment.

    Outside torchrun (no ``WORLD_SIZE`` above 1) this does nothing and returns a single-process
    context. The backend is nccl when CUDA is available, gloo otherwise; with nccl each process
    uses the GPU numbered by its ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed support")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return context()


def shutdown() -> None:
    """Leave the process group; every rank waits for the others first, so that none tears
    down its connections while a peer still uses them (gloo can abort the process then)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer already failed: nothing left to wait for
            pass
        dist.destroy_process_group()


class Objective(torch.nn.Module):
    """The model's training loss as a module ``forward``, which is what DDP wraps.

    A failed solve (SolverError, NonFiniteError) on one rank must not leave the others
    waiting in the gradient all-reduce: it becomes a NaN loss that touches every parameter,
    so every rank sees NaN gradients and handles the fault at the same step. The error
    message travels in the returned metrics.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor):
        from flowlab.errors import NonFiniteError, SolverError

        try:
            out = self.model.training_loss(*batch)
        except (SolverError, NonFiniteError) as err:
            params = [p for p in self.model.parameters() if p.requires_grad]
            poison = sum((p * float("nan")).sum() for p in params)
            return poison, {"fault": err}, []
        return out.loss, out.metrics, out.stats
