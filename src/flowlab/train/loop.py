"""The one training loop of flowlab: every model trains here, configured, never copied.

A model brings its objective (``model.training_loss(batch)``); the loop brings Adam, the
budget (iterations or seconds of training), the learning-rate schedule, logging, validation,
checkpoints, resume, and the checks that stop a run the moment a loss or gradient is not
finite.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowlab.errors import ConfigError, NonFiniteError, RunDirError, SolverError
from flowlab.models import DensityModel
from flowlab.train import checkpoint as ckpt

# A sampler returns a batch of data, or a tuple of tensors passed to training_loss in order
# (rectified flow trains on (data, noise) pairs).
Sampler = Callable[[int, torch.Generator], torch.Tensor | tuple[torch.Tensor, ...]]
SNAPSHOTS = "snapshots"
SCHEDULES = ("constant", "cosine")


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
        checkpoint_every: write the resume checkpoint every this many seconds.
        ema: decay of an exponential moving average of the weights (0: off). With it on,
            validation, snapshots and the saved model use the averaged weights; the decay is
            warmed up as ``min(ema, (1 + step) / (10 + step))``.
        snapshot_at: training times (seconds) at which the model weights are saved to
            ``snapshots/`` in the run folder, for time-to-quality curves.
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
    ema: float = 0.0
    snapshot_at: tuple[float, ...] = ()
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
    stopped_by: str = "budget"


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Learning rate at ``step`` with ``progress`` in [0, 1] of the budget used."""
    lr = config.lr
    if config.schedule == "cosine":
        floor = config.lr_min_ratio
        lr *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.warmup and step < config.warmup:
        lr *= (step + 1) / config.warmup
    return lr


def _progress(config: TrainConfig, step: int, seconds: float) -> float:
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


def _rng_tensors(data_gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state(), "rng.data": data_gen.get_state()}


def save_checkpoint(
    run_dir: Path, model: DensityModel, optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator, step: int, seconds: float, ema: WeightAverage | None = None,
) -> None:
    optim_tensors, optim_meta = ckpt.optimizer_to_tensors(optimizer)
    tensors = {**ckpt.model_tensors(model), **optim_tensors, **_rng_tensors(data_gen)}
    if ema is not None:
        tensors.update(ema.tensors())
    meta = {**ckpt.model_metadata(model), "step": step, "seconds": seconds, "optim": optim_meta}
    ckpt.save_tensors(run_dir / ckpt.CHECKPOINT, tensors, meta)


def _restore(
    run_dir: Path, model: DensityModel, optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator, ema: WeightAverage | None,
) -> tuple[int, float]:
    path = run_dir / ckpt.CHECKPOINT
    tensors, meta = ckpt.load_tensors(path)
    if meta.get("model") != model.name or meta.get("model_options") != model.config():
        raise RunDirError(f"{path}: the checkpoint was written for a different model")
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(state)
    optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors, meta["optim"]))
    torch.set_rng_state(tensors["rng.torch"])
    data_gen.set_state(tensors["rng.data"])
    if ema is not None:
        if not any(k.startswith("ema.") for k in tensors):
            raise RunDirError(f"{path}: the checkpoint has no weight average, but ema is on; "
                              "resume with the run's own options")
        ema.load(tensors)
    return int(meta["step"]), float(meta["seconds"])


def validation_nll(model: DensityModel, points: torch.Tensor) -> float:
    """Mean NLL (nats) of fixed held-out points, in eval mode (exact divergence by default).

    The training solver's tolerance is used rather than the tight evaluation one: this number
    tracks progress, `flowlab eval` gives the one to report.
    """
    was_training = model.training
    model.eval()
    solver = getattr(model, "solver", None)
    kwargs = {"solver": solver.replace(gradient="backprop", seminorm=False)} if solver else {}
    try:
        with torch.no_grad():
            value = float(-model.log_prob(points, **kwargs).mean())
    finally:
        model.train(was_training)
    return value


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

    Writes ``log.jsonl``, ``checkpoint.safetensors`` and ``model.safetensors`` to ``run_dir``
    (if given). With ``config.ema`` the model ends holding the averaged weights. With
    ``resume``, continues from the checkpoint there: the same seed and budget then continue
    the interrupted run step for step.
    """
    ref = next(iter(model.parameters()))
    data_gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    ema = WeightAverage(model, config.ema) if config.ema > 0 else None
    step, seconds = 0, 0.0
    if run_dir is not None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            step, seconds = _restore(run_dir, model, optimizer, data_gen, ema)
    log_file = open(run_dir / ckpt.LOG, "a") if run_dir is not None else None  # noqa: SIM115

    total = config.iters if config.iters is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"train {model.name}")
    val_marks = (
        [(i + 1) / config.val_every for i in range(config.val_every)]
        if val_points is not None and config.val_every > 0 else []
    )
    val_marks = [m for m in val_marks if m > _progress(config, step, seconds)]
    snapshot_marks = [t for t in config.snapshot_at if t > seconds] if run_dir is not None else []
    last_checkpoint = seconds
    metrics: dict[str, float] = {}
    stopped_by = "budget"
    model.train()
    try:
        while _progress(config, step, seconds) < 1.0:
            start = time.perf_counter()
            lr = learning_rate(config, step, _progress(config, step, seconds))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler(config.batch_size, data_gen)
            batch = tuple(b.to(ref) for b in (batch if isinstance(batch, tuple) else (batch,)))
            optimizer.zero_grad(set_to_none=True)
            try:
                out = model.training_loss(*batch)
                out.loss.backward()
            except (SolverError, NonFiniteError) as err:
                raise type(err)(f"step {step}: {err}") from err
            check_finite(step, out.loss.detach(), model)
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update(model, step)
            step += 1
            seconds += time.perf_counter() - start
            metrics = {**out.metrics, "loss": float(out.loss.detach()), "lr": lr}
            if out.stats:
                metrics["nfe_backward"] = float(sum(s.nfe_backward for s in out.stats))
            record: dict[str, Any] = {"step": step, "seconds": round(seconds, 3), **metrics}
            progress = _progress(config, step, seconds)
            if val_marks and progress >= val_marks[0]:
                val_marks = [m for m in val_marks if m > progress]
                with _averaged(ema, model):
                    record["val_nll"] = validation_nll(model, val_points.to(ref))
            while snapshot_marks and seconds >= snapshot_marks[0]:
                with _averaged(ema, model):
                    save_snapshot(run_dir, model, snapshot_marks.pop(0), seconds, step)
            if log_file is not None and (step % config.log_every == 0 or "val_nll" in record):
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
            if run_dir is not None and seconds - last_checkpoint >= config.checkpoint_every:
                save_checkpoint(run_dir, model, optimizer, data_gen, step, seconds, ema)
                last_checkpoint = seconds
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
    if run_dir is not None:
        save_checkpoint(run_dir, model, optimizer, data_gen, step, seconds, ema)
        with _averaged(ema, model):
            ckpt.save_model(run_dir / ckpt.WEIGHTS, model)
        if stopped_by == "interrupt":
            print(f"\ninterrupted at step {step}; resume with `flowlab train --resume {run_dir}`")
    if ema is not None:
        ema.copy_to(model)  # the trained model is the average (the checkpoint keeps both)
    return TrainResult(step, seconds, metrics, stopped_by)
