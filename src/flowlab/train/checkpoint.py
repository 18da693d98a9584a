"""Run folders and checkpoints: safetensors for tensors, JSON for everything else.

Nothing here ever unpickles: a model file received from someone else cannot run code.

Layout of a run folder::

    config.json              model name and options, dataset, training options
    model.safetensors        final (or latest) weights; metadata repeats config.json
    checkpoints/step-000000120.safetensors
                             resume states (weights, optimizer tensors, RNG states, step, clock,
                             learning-rate scale; JSON metadata), the last few kept
    log.jsonl                one JSON record per logged step
    eval.json, *.png, *.gif  written by `flowlab eval` and `flowlab plot`

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed, so
a process killed at any instant leaves the previous version readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import flowlab
from flowlab.errors import FlowlabError, RunDirError
from flowlab.models import DensityModel, build_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"  # keep_best: the weights with the lowest validation NLL
CHECKPOINTS = "checkpoints"
LEGACY_CHECKPOINT = "checkpoint.safetensors"  # flowlab 0.1 kept one checkpoint here
LOG = "log.jsonl"
# Format 2 changed the map of flowlab's masked affine autoregressive layers (MAF, IAF) from
# y = (x - mu) exp(-s) to y = x * s + b: format-1 files of other models read unchanged.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; give the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# -- resume checkpoints: one file per saved step, the newest few kept --------------------------
def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}.safetensors"


def _checkpoint_step(path: Path) -> int | None:
    stem = path.name.removesuffix(".safetensors")
    if not stem.startswith("step-") or not stem[5:].isdigit():
        return None
    return int(stem[5:])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Resume checkpoints of a run folder, newest (highest step) first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    if folder.is_dir():
        found = [p for p in folder.iterdir() if _checkpoint_step(p) is not None]
    found.sort(key=_checkpoint_step, reverse=True)
    legacy = Path(run_dir) / LEGACY_CHECKPOINT
    return found + ([legacy] if legacy.is_file() else [])


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (files set aside as corrupt stay)."""
    for path in list_checkpoints(run_dir)[keep:]:
        path.unlink(missing_ok=True)


def remove_temporaries(run_dir: Path) -> None:
    """Delete temporary files of :func:`atomic_write_bytes` left by a killed process."""
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)


def truncate_log(run_dir: Path, step: int) -> None:
    """Drop the log records written after ``step`` (the run resumes from there)."""
    path = Path(run_dir) / LOG
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_bytes(path, "".join(f"{line}\n" for line in kept).encode())


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Save tensors with JSON metadata (stored under the safetensors metadata key 'flowlab')."""
    meta = {"flowlab": json.dumps(metadata, sort_keys=True)}
    atomic_write_bytes(path, st_save(_contiguous(tensors), metadata=meta))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; a clear :class:`RunDirError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        metadata = json.loads((header.get("__metadata__") or {}).get("flowlab", "{}"))
    except (SafetensorError, ValueError, AttributeError, TypeError) as err:
        raise RunDirError(
            f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt"
        ) from err
    if not isinstance(metadata, dict):
        raise RunDirError(f"{path}: its flowlab metadata is not a JSON object; the file was "
                          "not written by flowlab")
    return tensors, metadata


def model_metadata(model: DensityModel) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "flowlab_version": flowlab.__version__,
        "model": model.name,
        "model_options": model.config(),
    }


def save_model(path: Path, model: DensityModel) -> None:
    """Weights plus the config that rebuilds the model, in one safetensors file."""
    save_tensors(path, model_tensors(model), model_metadata(model))


def model_tensors(model: DensityModel) -> dict[str, torch.Tensor]:
    """The model's state dict with every key under the prefix ``model.``."""
    return {f"model.{k}": v for k, v in model.state_dict().items()}


def check_format(metadata: dict[str, Any], source: Path | str,
                 model: DensityModel | None = None) -> None:
    """Raise :class:`RunDirError` unless this flowlab reads the file's format for ``model``
    (the model the file describes, once built)."""
    version = metadata.get("format_version")
    if version not in READABLE_FORMATS:
        raise RunDirError(
            f"{source}: written by an incompatible flowlab (format {version}, this flowlab "
            f"reads formats {', '.join(map(str, READABLE_FORMATS))}); retrain or use the "
            "matching flowlab version"
        )
    if version == 1 and model is not None:
        from flowlab.transforms.autoregressive import MaskedAffineAutoregressive

        if any(isinstance(m, MaskedAffineAutoregressive) for m in model.modules()):
            raise RunDirError(
                f"{source}: written by an older flowlab (format 1), whose MAF/IAF layers "
                "computed y = (x - mu) exp(-s); this flowlab computes y = x * s + b and "
                "would misread the weights. Retrain the model, or read it with flowlab 0.1"
            )


def model_from_metadata(metadata: dict[str, Any], source: Path) -> DensityModel:
    check_format(metadata, source)
    name, options = metadata.get("model"), metadata.get("model_options")
    if not isinstance(name, str) or not isinstance(options, dict):
        raise RunDirError(f"{source}: metadata lacks the model name or its options; the file is "
                          "not a flowlab model")
    try:
        model = build_model(name, **options)
    except (FlowlabError, TypeError, ValueError) as err:
        raise RunDirError(f"{source}: its model options do not build a {name!r} model ({err}); "
                          "the file is damaged or from another flowlab") from err
    check_format(metadata, source, model)
    return model


def load_model(path: Path, map_location: str | torch.device = "cpu") -> DensityModel:
    """Rebuild a model from a file written by :func:`save_model` (or a checkpoint)."""
    tensors, metadata = load_tensors(path)
    model = model_from_metadata(metadata, path)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise RunDirError(f"{path}: weights do not fit the model it describes ({err})") from err
    return model.to(map_location)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder, with errors that say what is missing or wrong."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} does not exist; train one with `flowlab train`")
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise RunDirError(f"{config_path} is missing: {run_dir} is not a flowlab run folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise RunDirError(f"{config_path} holds a JSON {type(config).__name__}, not an object: "
                          "not a flowlab run configuration")
    missing = [k for k in ("dataset", "model", "model_options", "train") if k not in config]
    if missing:
        raise RunDirError(f"{config_path} lacks {missing}: not a flowlab run configuration")
    return config


def load_run(run_dir: Path) -> tuple[DensityModel, dict[str, Any]]:
    """The model and config of a run folder, with errors that say what is missing."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunDirError(
            f"{weights} is missing: training has not written a model yet; resume it with "
            f"`flowlab train --resume {run_dir}`"
        )
    return load_model(weights), config


# -- optimizer state <-> flat tensors + JSON ---------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
