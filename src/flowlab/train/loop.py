"""The one training loop of flowlab: every model trains here, configured, never copied.

A model brings its objective (``model.training_loss(batch)``); the loop brings Adam, the
budget (iterations or seconds of training), the learning-rate schedule, logging, validation,
checkpoints, resume, and the checks that stop a run the moment a loss or gradient is not
finite.
"""

from __future__ import annotations

import gc
import json
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowlab.errors import ConfigError, DataError, NonFiniteError, RunDirError, SolverError
from flowlab.models import DensityModel
from flowlab.models.base import LossOutput
from flowlab.train import checkpoint as ckpt
from flowlab.train import distributed

# A sampler returns a batch of data, or a tuple of tensors passed to training_loss in order
# (rectified flow trains on (data, noise) pairs).
Sampler = Callable[[int, torch.Generator], torch.Tensor | tuple[torch.Tensor, ...]]
SNAPSHOTS = "snapshots"
SCHEDULES = ("constant", "cosine")
NONFINITE_POLICIES = ("restore", "stop")


SPIKE_WARNING_EVERY = 500  # steps between two warnings of a loss spike


@dataclass
class TrainConfig:
    """Options of the training loop.

    Attributes:
        iters: stop after this many optimizer steps (None: no step limit).
        seconds: stop after this many seconds of training (validation and checkpoint time
            excluded; None: no time limit). At least one of ``iters`` and ``seconds`` is needed.
        batch_size: points per step, drawn fresh from the data generator.
        lr, weight_decay: Adam(W) options.
        schedule: ``constant`` or ``cosine`` decay to ``lr * lr_min_ratio`` over the budget
            (the fraction of iterations or seconds used, whichever is further along).
        warmup: linear warm-up over this many steps.
        grad_clip: clip the global gradient norm (None: off).
        log_every: write a log record every this many steps.
        val_every: validate (NLL on ``val_size`` fixed held-out points) this many times over
            the budget (0: never).
        checkpoint_every: write a resume checkpoint every this many seconds of training.
        checkpoint_every_steps: also every this many steps (None: by time only). A process
            killed with SIGKILL loses at most one interval.
        keep_checkpoints: how many of the newest checkpoints to keep in ``checkpoints/``.
        on_nonfinite: what a NaN/Inf loss or gradient, or a failed ODE solve, does:
            ``restore`` (the last good state, with half the learning rate) or ``stop``.
        max_restores: restores allowed before the run stops with the error.
        ema: decay of an exponential moving average of the weights (0: off). With it on,
            validation, snapshots and the saved model use the averaged weights; the decay is
            warmed up as ``min(ema, (1 + step) / (10 + step))``.
        snapshot_at: training times (seconds) at which the model weights are saved to
            ``snapshots/`` in the run folder, for time-to-quality curves.
        keep_best: model selection on the validation points (early stopping without
            stopping): the weights with the lowest validation NLL so far are kept (in
            ``best.safetensors`` in the run folder), and the trained model (returned, and
            saved as ``model.safetensors``) is that one rather than the last. Needs
            validation (``val_every > 0`` and validation points). Resume checkpoints still
            hold the last state, so a resumed run continues training where it stopped.
        seed: seeds the initialization, the data stream and the probes.
    """

    iters: int | None = None
    seconds: float | None = None
    batch_size: int = 512
    lr: float = 5e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    lr_min_ratio: float = 0.01
    warmup: int = 0
    grad_clip: float | None = None
    log_every: int = 10
    val_every: int = 10
    val_size: int = 2000
    checkpoint_every: float = 60.0
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 3
    on_nonfinite: str = "restore"
    max_restores: int = 3
    ema: float = 0.0
    snapshot_at: tuple[float, ...] = ()
    keep_best: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters is None and self.seconds is None:
            raise ConfigError("give a training budget: iters, seconds, or both")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"iters must be at least 1, got {self.iters}")
        if self.seconds is not None and not (self.seconds > 0):
            raise ConfigError(f"seconds must be positive, got {self.seconds}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0) or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be at least 1, got {self.log_every}")
        if not (self.checkpoint_every > 0):
            raise ConfigError(f"checkpoint_every must be positive seconds, got "
                              f"{self.checkpoint_every}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ConfigError(f"checkpoint_every_steps must be at least 1, got "
                              f"{self.checkpoint_every_steps}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"unknown on_nonfinite policy {self.on_nonfinite!r}; choose one "
                              f"of {NONFINITE_POLICIES}")
        if self.max_restores < 0:
            raise ConfigError(f"max_restores must be >= 0, got {self.max_restores}")
        if self.keep_best and self.val_every < 1:
            raise ConfigError("keep_best selects the weights by validation: it needs "
                              "val_every >= 1")
        if not (0 <= self.ema < 1):
            raise ConfigError(f"ema is a decay in [0, 1) (0: off), got {self.ema}")
        self.snapshot_at = tuple(sorted(float(s) for s in self.snapshot_at))
        if any(not (s > 0) for s in self.snapshot_at):
            raise ConfigError(f"snapshot times must be positive seconds, got {self.snapshot_at}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    stopped_by: str = "budget"  # or "SIGINT", "SIGTERM"
    restores: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # with keep_best: step, seconds, val_nll of the model


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate at ``step`` with ``progress`` in [0, 1] of the budget used."""
    lr = config.lr
    if config.schedule == "cosine":
        floor = config.lr_min_ratio
        lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.warmup and step < config.warmup:
        lr *= (step + 1) / config.warmup
    return lr


def budget_progress(config: TrainConfig, step: int, seconds: float) -> float:
    """Fraction of the budget used: the further along of iterations and seconds."""
    fractions = []
    if config.iters is not None:
        fractions.append(step / config.iters)
    if config.seconds is not None:
        fractions.append(seconds / config.seconds)
    return max(fractions)


def check_finite(step: int, loss: torch.Tensor, model: torch.nn.Module) -> None:
    """Raise NonFiniteError naming the step if the loss or a gradient is NaN or Inf."""
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"step {step}: the training loss is {float(loss)}; lower the learning rate or add "
            "the kinetic/jacobian regularizers, then resume from the last checkpoint"
        )
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise NonFiniteError(
                f"step {step}: the gradient of parameter {name!r} contains NaN or Inf; lower "
                "the learning rate or set --grad-clip, then resume from the last checkpoint"
            )


class WeightAverage:
    """Exponential moving average of a model's parameters (Polyak averaging)."""

    def __init__(self, model: DensityModel, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: DensityModel, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, model: DensityModel) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: DensityModel):
        """Within the block the model holds the averaged weights."""
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(saved[name])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t for n, t in self.shadow.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(tensors[f"ema.{name}"])


def _averaged(ema: WeightAverage | None, model: DensityModel):
    return ema.applied(model) if ema is not None else nullcontext(model)


def save_snapshot(
    run_dir: Path, model: DensityModel, at: float, seconds: float, step: int
) -> None:
    """Save the weights as ``snapshots/t00060.safetensors`` (``at`` = 60 s; fractional times
    keep their decimals) and list them, with the actual clock and step, in snapshots.json."""
    folder = run_dir / SNAPSHOTS
    folder.mkdir(exist_ok=True)
    stem = f"t{int(at):05d}" if float(at).is_integer() else f"t{at:09.3f}"
    name = f"{stem}.safetensors"
    ckpt.save_model(folder / name, model)
    index = folder / "snapshots.json"
    entries = json.loads(index.read_text()) if index.is_file() else []
    entries = [e for e in entries if e["file"] != name]
    entries.append({"at": at, "seconds": round(seconds, 3), "step": step, "file": name})
    ckpt.atomic_write_json(index, sorted(entries, key=lambda e: e["at"]))


# -- the resume state: one payload, kept in memory as the last good state and saved to disk ----
def _rng_states() -> dict[str, Any]:
    """This process's global random states (torch, numpy, python) as tensors and JSON."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_rest": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_state), py_gauss],
    }


def _payload(
    model: DensityModel, optimizer: torch.optim.Optimizer, data_gen: torch.Generator,
    ema: WeightAverage | None, step: int, seconds: float, lr_scale: float, restores: list,
    best: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything needed to continue training exactly: tensors (copied) and JSON metadata.

    Under torch.distributed this is a collective: the random states of every rank are
    gathered (``rng.r1.torch`` ... for rank 1), so every rank must call it at the same step.
    """
    optim_tensors, optim_meta = ckpt.optimizer_to_tensors(optimizer)
    tensors = {**ckpt.model_tensors(model), **optim_tensors, "rng.data": data_gen.get_state()}
    if ema is not None:
        tensors.update(ema.tensors())
    meta_rng = {}
    ranks = distributed.context()
    for rank, states in enumerate(ranks.gather(_rng_states())):
        prefix = f"rng.r{rank}." if rank else "rng."
        tensors[prefix + "torch"] = states["torch"]
        tensors[prefix + "numpy"] = states["numpy"]
        meta_rng[str(rank)] = {"numpy": states["numpy_rest"], "python": states["python"]}
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}
    meta = {
        **ckpt.model_metadata(model), "step": step, "seconds": seconds, "lr_scale": lr_scale,
        "restores": restores, "optim": optim_meta, "world_size": ranks.world_size,
        "rng": meta_rng, "best": best,
    }
    return tensors, json.loads(json.dumps(meta))  # a deep copy, and proof that it is JSON


def _apply_payload(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], source: str, model: DensityModel,
    optimizer: torch.optim.Optimizer, data_gen: torch.Generator, ema: WeightAverage | None,
) -> None:
    if meta.get("model") != model.name or meta.get("model_options") != model.config():
        raise RunDirError(f"{source}: the checkpoint was written for a different model "
                          f"({meta.get('model')!r}); resume with the run's own config.json")
    ckpt.check_format(meta, source, model)
    if ema is not None and not any(k.startswith("ema.") for k in tensors):
        raise RunDirError(f"{source}: the checkpoint has no weight average, but ema is on; "
                          "resume with the run's own options")
    ranks = distributed.context()
    if meta.get("world_size", 1) != ranks.world_size:
        raise RunDirError(
            f"{source}: written by {meta.get('world_size', 1)} process(es), resumed by "
            f"{ranks.world_size}; resume with the same number (torchrun --nproc_per_node), "
            "so that every data stream and random state continues exactly")
    try:
        state = {k.removeprefix("model."): v for k, v in tensors.items()
                 if k.startswith("model.")}
        model.load_state_dict(state)
        optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, meta["optim"]))
        data_gen.set_state(tensors["rng.data"])
        prefix = f"rng.r{ranks.rank}." if ranks.rank else "rng."
        torch.set_rng_state(tensors[prefix + "torch"])
        rng = meta.get("rng", {}).get(str(ranks.rank))
        if rng is not None:  # checkpoints of flowlab 0.1 kept the torch state only
            name, pos, has_gauss, gauss = rng["numpy"]
            keys = tensors[prefix + "numpy"].numpy().astype(np.uint32)
            np.random.set_state((name, keys, pos, has_gauss, gauss))
            version, state_ints, py_gauss = rng["python"]
            random.setstate((version, tuple(state_ints), py_gauss))
        if ema is not None:
            ema.load(tensors)
    except (KeyError, RuntimeError, ValueError, TypeError) as err:
        raise RunDirError(f"{source}: incomplete or inconsistent resume state ({err!r}); "
                          "resume from an older checkpoint or start the run again") from err


def save_checkpoint(run_dir: Path, tensors: dict, meta: dict, keep: int) -> Path:
    """Write a payload as ``checkpoints/step-N.safetensors``; keep the ``keep`` newest."""
    path = ckpt.checkpoint_path(run_dir, meta["step"])
    path.parent.mkdir(exist_ok=True)
    ckpt.save_tensors(path, tensors, meta)
    ckpt.prune_checkpoints(run_dir, keep)
    return path


def load_latest_checkpoint(run_dir: Path) -> tuple[dict, dict, Path]:
    """The newest readable checkpoint of a run folder.

    Unreadable newer ones (truncated, corrupt) are renamed ``*.corrupt`` with a warning that
    names each file and its problem, so that the run continues from the previous good one.
    """
    candidates = ckpt.list_checkpoints(run_dir)
    if not candidates:
        raise RunDirError(f"{run_dir} has no checkpoint to resume from (none in "
                          f"{Path(run_dir) / ckpt.CHECKPOINTS}); start the run again")
    problems = []
    for path in candidates:
        try:
            tensors, meta = ckpt.load_tensors(path)
            if "step" not in meta or "optim" not in meta:
                raise RunDirError(f"{path}: not a resume checkpoint (no step or optimizer)")
        except RunDirError as err:
            problems.append(str(err))
            continue
        for bad in candidates[: len(problems)]:
            if bad.exists() and bad.parent.name == ckpt.CHECKPOINTS:
                bad.replace(bad.with_name(bad.name + ".corrupt"))
        for problem in problems:
            warnings.warn(f"skipped an unreadable checkpoint, set aside as *.corrupt: {problem}",
                          stacklevel=2)
        return tensors, meta, path
    raise RunDirError(f"no readable checkpoint in {run_dir}:\n  " + "\n  ".join(problems))


@contextmanager
def _writing(what: str, run_dir: Path, last_good: Path | None):
    """Turn a failed write (disk full, permissions) into one clear error about resuming."""
    try:
        yield
    except OSError as err:
        where = (f"the last good checkpoint is {last_good}" if last_good is not None
                 else "no checkpoint was written yet")
        raise RunDirError(
            f"could not write {what} in {run_dir}: {err.strerror or err}; {where}. Free disk "
            f"space or fix the folder's permissions, then continue with "
            f"`flowlab train --resume {run_dir}`"
        ) from err


class SpikeWatch:
    """Flags a training loss far above its recent level: a loss spike. Such a loss is finite,
    so it is no fault for ``on_nonfinite``, and most spikes pass within a few steps; but a run
    can also jump there and stay (a Glow on MNIST went from -1,234 to +110,866 nats per image
    around step 1,100 at lr 1e-3 without clipping, and never came back). The recent level is an
    exponential moving mean and variance of the losses (decay ``decay``); after ``warmup``
    losses, one more than ``z`` moving s.d. above the mean is a spike, and is kept out of the
    averages so that a run stuck up there keeps being flagged. A falling loss is never
    flagged. (Replayed over this machine's 59 two-dimensional benchmark logs, z = 20 flags
    three brief spikes in two runs; z = 10 flags eleven in six.)"""

    def __init__(self, z: float = 20.0, warmup: int = 100, decay: float = 0.99) -> None:
        self.z, self.warmup, self.decay = z, warmup, decay
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def __call__(self, loss: float) -> float | None:
        """The loss's distance above the mean in s.d. if it is a spike, else None."""
        if self.count >= self.warmup and self.var > 0:
            sd = math.sqrt(self.var)
            if loss > self.mean + self.z * sd:
                return (loss - self.mean) / sd
        delta = loss - self.mean if self.count else 0.0
        self.mean = self.mean + (1 - self.decay) * delta if self.count else loss
        self.var = self.decay * (self.var + (1 - self.decay) * delta * delta)
        self.count += 1
        return None

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)


class _StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current step (a second SIGINT stops
    at once). Handlers are only installed in the main thread, and restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


def check_first_batch(batch: tuple[torch.Tensor, ...], model: DensityModel) -> None:
    """Validate a sampler's output before anything is written: a clear DataError otherwise."""
    for tensor in batch:
        if not isinstance(tensor, torch.Tensor):
            raise DataError(f"the data sampler returned {type(tensor).__name__}, not a tensor of "
                            "points; it must return a (batch, *event_shape) tensor")
        if tensor.ndim == 0 or tensor.shape[0] == 0:
            raise DataError(f"the data sampler returned an empty batch (shape "
                            f"{tuple(tensor.shape)}); is the data set empty?")
    model.check_input(batch[0])


def validation_nll(model: DensityModel, points: torch.Tensor, batch_size: int | None = None,
                   stop: Callable[[], bool] | None = None) -> float | None:
    """Mean NLL (nats) of fixed held-out points, in eval mode (exact divergence by default).

    The training solver's tolerance and divergence are used rather than the tight, exact
    evaluation ones (on images the exact divergence costs one backward pass per pixel): this
    number tracks progress, `flowlab eval` gives the one to report. A fixed-grid training
    solver (rk4 with 4 steps, say) is not used: maximum likelihood can game the likelihood of
    the discretized flow, which then falls below the exact one (below the true entropy even)
    while the model gets worse, and a validation by the same discretization would reward it;
    the model's adaptive evaluation solver validates instead. The points go through in
    chunks of ``batch_size`` (all at once if None); ``stop`` is asked between chunks and, when
    it answers True, the validation is abandoned and None returned, so that a stop signal
    is honoured within one chunk rather than after a validation by the ODE that can take
    minutes. Under torch.distributed each rank evaluates its share of the points and the sums
    are reduced (a collective: every rank must finish, so ``stop`` must be None there).
    """
    ranks = distributed.context()
    if ranks.active and stop is not None:
        raise ConfigError("validation_nll cannot be abandoned under torch.distributed (the "
                          "ranks reduce their sums together): pass stop=None")
    shard = points[ranks.rank::ranks.world_size]
    size = max(int(batch_size or len(shard)), 1)  # an empty shard: no chunk, a sum of 0
    was_training = model.training
    model.eval()
    solver = getattr(model, "solver", None)
    if solver is not None and not solver.adaptive:
        solver = model.eval_solver
    kwargs = {}
    if solver is not None:
        kwargs = {"solver": solver.replace(gradient="backprop", seminorm=False),
                  "divergence": model.options["divergence"],
                  "generator": torch.Generator(device=points.device).manual_seed(0)}
    total = 0.0
    try:
        with torch.no_grad():
            for begin in range(0, len(shard), size):
                if stop is not None and stop():
                    return None
                total += float(-model.log_prob(shard[begin:begin + size], **kwargs).sum())
    finally:
        model.train(was_training)
    total, count = ranks.sum([total, float(len(shard))])
    return total / count


def data_generator(seed: int) -> torch.Generator:
    """The generator of the training data stream for ``seed`` (the loop's, and the peers')."""
    return torch.Generator(device="cpu").manual_seed(seed + 1)


def data_stream(dataset: Any, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The batches ``dataset.sample(batch_size, generator)`` that a single-process run with
    ``seed`` trains on, in order (for peers trained on the same data)."""
    generator = data_generator(seed)
    while True:
        yield dataset.sample(batch_size, generator=generator)


def _draw(sampler: Sampler, config: TrainConfig, data_gen: torch.Generator,
          ranks: distributed.Context) -> tuple[torch.Tensor, ...]:
    """This rank's batch: its slice of the global batch of ``world_size * batch_size``."""
    batch = sampler(config.batch_size * ranks.world_size, data_gen)
    batch = batch if isinstance(batch, tuple) else (batch,)
    if ranks.active:
        batch = tuple(ranks.shard(b) if isinstance(b, torch.Tensor) else b for b in batch)
    return batch


def train(
    model: DensityModel,
    sampler: Sampler,
    config: TrainConfig,
    run_dir: Path | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    val_points: torch.Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``model`` on points from ``sampler(batch_size, generator)``.

    Writes ``log.jsonl``, ``checkpoints/`` and ``model.safetensors`` to ``run_dir`` (if
    given). With ``config.ema`` the model ends holding the averaged weights. With ``resume``,
    continues from the newest readable checkpoint there: the same config then continues the
    interrupted run step for step (bitwise, with an ``iters`` budget on the same hardware).

    A NaN or Inf loss or gradient, or a failed ODE solve, is handled by
    ``config.on_nonfinite``: ``restore`` goes back to the last good state (the last
    checkpoint, kept in memory) with half the learning rate, at most ``config.max_restores``
    times; ``stop`` (or one fault too many) raises the error with the step and the quantity.
    SIGINT and SIGTERM stop after the current step with a checkpoint written.

    Inside a torch.distributed process group (``torchrun``) the model is trained with
    DistributedDataParallel; see :mod:`flowlab.train.distributed` for how data, seeds and
    writing are shared out. Only rank 0 writes.
    """
    if config.keep_best and val_points is None:
        raise ConfigError("keep_best selects the weights by validation: give val_points")
    ranks = distributed.context()
    ref = next(iter(model.parameters()))
    data_gen = data_generator(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    ema = WeightAverage(model, config.ema) if config.ema > 0 else None
    step, seconds, lr_scale, restores = 0, 0.0, 1.0, []
    best: dict[str, Any] | None = None  # keep_best: the validation record of best_state
    best_state: dict[str, torch.Tensor] | None = None
    last_path: Path | None = None
    run_dir = Path(run_dir) if run_dir is not None else None
    writer = run_dir if ranks.is_main else None  # the folder this process writes to
    if ranks.active:
        # Same initial weights on every rank (DDP broadcasts rank 0's); different noise.
        torch.manual_seed(config.seed + distributed.RANK_SEED_STRIDE * ranks.rank)
    if run_dir is not None and resume:
        tensors, meta, last_path = load_latest_checkpoint(run_dir)
        _apply_payload(tensors, meta, str(last_path), model, optimizer, data_gen, ema)
        step, seconds = int(meta["step"]), float(meta["seconds"])
        lr_scale, restores = float(meta.get("lr_scale", 1.0)), list(meta.get("restores", []))
        best = meta.get("best") if config.keep_best else None
        if best is not None:
            best_state = _read_best(run_dir, best)
    # The first batch is checked before anything is written, initializes data-dependent
    # layers (ActNorm: from the whole global batch, so every rank gets the same weights), and
    # is then drawn again.
    state = data_gen.get_state()
    first = sampler(config.batch_size * ranks.world_size, data_gen)
    first = first if isinstance(first, tuple) else (first,)
    check_first_batch(tuple(ranks.shard(b) if isinstance(b, torch.Tensor) else b
                            for b in first), model)
    if not resume:
        model.data_init(*(b.to(ref) for b in first))
    data_gen.set_state(state)
    if writer is not None:
        try:
            writer.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"cannot create the run folder {writer}: "
                              f"{err.strerror or err}") from err
        ckpt.remove_temporaries(writer)  # left by a process killed while writing
        if resume:
            ckpt.truncate_log(writer, step)
    objective = None
    if ranks.active:
        from torch.nn.parallel import DistributedDataParallel

        devices = [ref.device.index] if ref.device.type == "cuda" else None
        objective = DistributedDataParallel(distributed.Objective(model), device_ids=devices)
    last_good = _payload(model, optimizer, data_gen, ema, step, seconds, lr_scale, restores,
                         best)
    if writer is not None and not resume:
        # A checkpoint at step 0: a run killed before its first interval resumes from its
        # exact start (with any weights it was initialized from).
        with _writing("a checkpoint", writer, None):
            last_path = save_checkpoint(writer, *last_good, config.keep_checkpoints)

    bar = None
    if progress and ranks.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.iters, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"train {model.name}")

    def marks(progress_now: float, seconds_now: float) -> tuple[list[float], list[float]]:
        val = ([(i + 1) / config.val_every for i in range(config.val_every)]
               if val_points is not None and config.val_every > 0 else [])
        snaps = list(config.snapshot_at) if writer is not None else []
        return [m for m in val if m > progress_now], [t for t in snaps if t > seconds_now]

    def loss_and_backward(batch: tuple[torch.Tensor, ...]) -> LossOutput:
        if objective is None:
            out = model.training_loss(*batch)
            out.loss.backward()
            return out
        loss, metrics, stats = objective(*batch)
        loss.backward()  # the gradient all-reduce: every rank takes part, even after a fault
        fault = metrics.pop("fault", None)
        if fault is not None:
            raise fault
        return LossOutput(loss, metrics, stats)

    val_marks, snapshot_marks = marks(budget_progress(config, step, seconds), seconds)
    last_checkpoint = (step, seconds)
    metrics: dict[str, float] = {}
    stopped_by = "budget"
    stop_requested = False
    spikes, last_spike_warning = SpikeWatch(), -SPIKE_WARNING_EVERY
    updating = False  # True while parameters and counters disagree (mid-update)
    log_file = None
    model.train()
    with _StopSignals() as signals:
        try:
            if writer is not None:
                with _writing(ckpt.LOG, writer, last_path):
                    log_file = open(writer / ckpt.LOG, "a")  # noqa: SIM115
            while budget_progress(config, step, seconds) < 1.0:
                if stop_requested:
                    stopped_by = signals.name or "SIGTERM"  # another rank may have seen it
                    break
                start = time.perf_counter()
                lr = lr_scale * learning_rate(config, step, budget_progress(config, step, seconds))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = tuple(b.to(ref) for b in _draw(sampler, config, data_gen, ranks))
                optimizer.zero_grad(set_to_none=True)
                try:
                    out = loss_and_backward(batch)
                    check_finite(step, out.loss.detach(), model)
                except (SolverError, NonFiniteError) as err:
                    text = str(err) if str(err).startswith("step ") else f"step {step}: {err}"
                    tensors, meta = last_good
                    hopeless = not all(torch.isfinite(v).all() for k, v in tensors.items()
                                       if k.startswith("model.") and v.is_floating_point())
                    if hopeless:
                        text += ("; the parameters of the last good state are themselves not "
                                 "finite, so restoring it cannot help")
                    if (config.on_nonfinite == "stop" or hopeless
                            or len(restores) >= config.max_restores):
                        if restores:
                            text += (f" (after {len(restores)} restore(s) of the last good "
                                     f"state with half the learning rate each)")
                        raise type(err)(text) from err
                    _apply_payload(tensors, meta, "the last good state", model, optimizer,
                                   data_gen, ema)
                    restores.append({"step": step, "restored_step": meta["step"],
                                     "error": text})
                    step, seconds = int(meta["step"]), float(meta["seconds"])
                    lr_scale = float(meta["lr_scale"]) * 0.5
                    if ranks.is_main:
                        warnings.warn(
                            f"{text}; restored the state of step {step} and halved the "
                            f"learning rate (scale {lr_scale:g}; restore {len(restores)} of at "
                            f"most {config.max_restores})", stacklevel=2)
                    last_good = _payload(model, optimizer, data_gen, ema, step, seconds,
                                         lr_scale, restores, best)
                    if writer is not None:
                        log_file.close()
                        with _writing(ckpt.LOG, writer, last_path):
                            ckpt.truncate_log(writer, step)
                            log_file = open(writer / ckpt.LOG, "a")  # noqa: SIM115
                    now = budget_progress(config, step, seconds)
                    val_marks, snapshot_marks = marks(now, seconds)
                    if bar is not None:
                        bar.n = step
                    continue
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                updating = True
                optimizer.step()
                if ema is not None:
                    ema.update(model, step)
                step += 1
                seconds += time.perf_counter() - start
                updating = False
                # All ranks follow the slowest clock and stop together on a signal.
                seconds, stop = ranks.max([seconds, float(signals.signum is not None)])
                stop_requested = stop > 0
                metrics = {**out.metrics, "loss": float(out.loss.detach()), "lr": lr}
                spike = spikes(metrics["loss"])
                if spike is not None:
                    metrics["loss_spike"] = spike
                    if ranks.is_main and step - last_spike_warning >= SPIKE_WARNING_EVERY:
                        last_spike_warning = step
                        warnings.warn(
                            f"step {step}: the training loss {metrics['loss']:.6g} is "
                            f"{spike:.0f} s.d. above its recent mean {spikes.mean:.6g} "
                            f"(s.d. {spikes.sd:.3g}): a loss spike. If the loss does not come "
                            f"back down, train again with --grad-clip (e.g. 50) or a lower --lr "
                            f"(repeats of this warning come at most every "
                            f"{SPIKE_WARNING_EVERY} steps; the log marks each spike as "
                            f"loss_spike)", stacklevel=2)
                if out.stats:
                    metrics["nfe_backward"] = float(sum(s.nfe_backward for s in out.stats))
                record: dict[str, Any] = {"step": step, "seconds": round(seconds, 3), **metrics}
                now = budget_progress(config, step, seconds)
                if val_marks and now >= val_marks[0]:
                    val_marks = [m for m in val_marks if m > now]
                    with _averaged(ema, model):
                        val_nll = validation_nll(
                            model, val_points.to(ref), batch_size=config.batch_size,
                            stop=None if ranks.active else lambda: signals.signum is not None)
                    if val_nll is None:  # a stop signal came during the validation
                        stop_requested = True
                    else:
                        record["val_nll"] = val_nll
                        if config.keep_best and math.isfinite(record["val_nll"]) and (
                                best is None or record["val_nll"] < best["val_nll"]):
                            best = {"step": step, "seconds": round(seconds, 3),
                                    "val_nll": record["val_nll"]}
                            best_state = {k: v.detach().clone()
                                          for k, v in model.state_dict().items()}
                            if writer is not None:
                                with _writing("the best model", writer, last_path):
                                    ckpt.save_model(writer / ckpt.BEST, model)
                            record["best"] = True
                while snapshot_marks and seconds >= snapshot_marks[0]:
                    with _averaged(ema, model), _writing("a snapshot", writer, last_path):
                        save_snapshot(writer, model, snapshot_marks.pop(0), seconds, step)
                if log_file is not None and (step % config.log_every == 0 or "val_nll" in record):
                    with _writing(ckpt.LOG, writer, last_path):
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                if callback is not None:
                    callback(record)
                if bar is not None:
                    bar.update(1)
                    shown = {"nll": f"{metrics.get('nll', float('nan')):.3f}",
                             "nfe": int(metrics.get("nfe_forward", 0)), "s": int(seconds)}
                    if "val_nll" in record:
                        shown["val"] = f"{record['val_nll']:.3f}"
                    bar.set_postfix(shown, refresh=False)
                due = (seconds - last_checkpoint[1] >= config.checkpoint_every
                       or (config.checkpoint_every_steps is not None
                           and step - last_checkpoint[0] >= config.checkpoint_every_steps))
                if due:
                    last_good = _payload(model, optimizer, data_gen, ema, step, seconds,
                                         lr_scale, restores, best)
                    last_checkpoint = (step, seconds)
                    if writer is not None:
                        with _writing("a checkpoint", writer, last_path):
                            last_path = save_checkpoint(writer, *last_good,
                                                        config.keep_checkpoints)
        except KeyboardInterrupt:
            stopped_by = "SIGINT"
        finally:
            if bar is not None:
                bar.close()
            if log_file is not None:
                log_file.close()
    if updating:  # interrupted inside an update: the parameters are not those of any step
        tensors, meta = last_good
        _apply_payload(tensors, meta, "the last good state", model, optimizer, data_gen, ema)
        step, seconds = int(meta["step"]), float(meta["seconds"])
    if run_dir is not None:
        payload = _payload(model, optimizer, data_gen, ema, step, seconds, lr_scale, restores,
                           best)
        if writer is not None:
            with _writing("the final checkpoint", writer, last_path):
                last_path = save_checkpoint(writer, *payload, config.keep_checkpoints)
                if best is not None:
                    ckpt.atomic_write_bytes(writer / ckpt.WEIGHTS,
                                            (writer / ckpt.BEST).read_bytes())
                else:
                    with _averaged(ema, model):
                        ckpt.save_model(writer / ckpt.WEIGHTS, model)
            if stopped_by != "budget":
                print(f"\nstopped by {stopped_by} at step {step}; checkpoint written to "
                      f"{last_path}; resume with `flowlab train --resume {run_dir}`", flush=True)
    if ema is not None:
        ema.copy_to(model)  # the trained model is the average (the checkpoint keeps both)
    if best_state is not None:
        model.load_state_dict(best_state)  # the selected model (the checkpoint keeps the last)
    if objective is not None:
        # Free DDP's reducer now, while the process group is alive: collected later (it sits
        # in reference cycles), its gloo work can outlive the group and abort the process.
        del objective, loss_and_backward
        gc.collect()
    return TrainResult(step, seconds, metrics, stopped_by, restores, best)


def _read_best(run_dir: Path, best: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The weights of ``best.safetensors`` when resuming a keep_best run (None on a rank
    that cannot see the run folder: only rank 0 writes, and its model is the one saved)."""
    path = Path(run_dir) / ckpt.BEST
    if not path.is_file():
        if distributed.context().is_main:
            raise RunDirError(f"{path} is missing, but the checkpoint records a best model "
                              f"(step {best.get('step')}); restore the file or train again")
        return None
    tensors, _ = ckpt.load_tensors(path)
    return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
