"""Density heat maps, sample plots and training curves for 2-D models, written to image files.

Everything renders off-screen with matplotlib's Agg canvas on a :class:`~matplotlib.figure.Figure`
of its own: pyplot is never imported, so no global backend or figure state is touched.

Grid convention: a square window ``[-bounds, bounds]^2`` is cut into ``resolution^2`` equal cells
and densities are evaluated at the cell centres, so ``sum(p) * cell_area`` is the midpoint-rule
integral of ``p`` over the window (about 1 when the window holds almost all of the mass).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LogProbFn = Callable[[torch.Tensor], torch.Tensor]


def grid_log_prob(
    log_prob_fn: LogProbFn,
    bounds: float,
    resolution: int = 200,
    chunk: int = 5000,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate a 2-D log-density at the cell centres of a square grid, in chunks, without grad.

    Args:
        log_prob_fn: maps points ``(batch, 2)`` to log-densities ``(batch,)`` in nats.
        bounds: half-width of the window ``[-bounds, bounds]^2``.
        resolution: number of cells along each axis.
        chunk: at most this many points per call of ``log_prob_fn``.
        dtype, device: of the point tensors handed to ``log_prob_fn``.

    Returns:
        ``xs`` ``(resolution,)`` and ``ys`` ``(resolution,)``, the cell centres (float64), and
        ``logp`` ``(resolution, resolution)`` (float64) with ``logp[i, j] = log p(xs[j], ys[i])``
        (rows are y, as ``imshow(..., origin="lower")`` expects).
    """
    if not bounds > 0:
        raise ValueError(f"bounds must be positive, got {bounds}")
    if resolution < 1 or chunk < 1:
        raise ValueError(f"resolution and chunk must be >= 1, got {resolution} and {chunk}")
    step = 2.0 * bounds / resolution
    centres = -bounds + step * (np.arange(resolution, dtype=np.float64) + 0.5)
    gx, gy = np.meshgrid(centres, centres)  # gx[i, j] = xs[j], gy[i, j] = ys[i]
    points = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype)
    points = points.to(device) if device is not None else points
    values = []
    with torch.no_grad():
        for start in range(0, points.shape[0], chunk):
            out = log_prob_fn(points[start : start + chunk])
            values.append(out.detach().reshape(-1).to("cpu", torch.float64))
    logp = torch.cat(values).numpy().reshape(resolution, resolution)
    return centres, centres.copy(), logp


def grid_mass(logp: np.ndarray, bounds: float) -> float:
    """Midpoint-rule integral ``sum(exp(logp)) * cell_area`` of a :func:`grid_log_prob` grid."""
    cell_area = (2.0 * bounds / logp.shape[1]) * (2.0 * bounds / logp.shape[0])
    return float(np.exp(logp).sum() * cell_area)


def plot_density_comparison(
    model: Any,
    dataset: Any,
    path: str | os.PathLike,
    resolution: int = 200,
    n_samples: int = 20000,
    solver: Any = None,
) -> dict[str, Any]:
    """Four panels on one square window: true and model density heat maps, data and model samples.

    The model is evaluated in eval mode (its previous mode is restored afterwards), with
    ``model.log_prob(x, solver=solver)`` when a (looser) solver is given. The figure title
    carries grid integrals that serve as sanity checks: the model's mass on the window (about 1
    for a correct log-density whose mass lies in the window), and the cross-entropy
    ``-sum p_true log p_model dA`` against the true entropy ``-sum p_true log p_true dA``, in nats.

    Args:
        model: has ``log_prob((n, 2)) -> (n,)`` and ``sample((n,)) -> (n, 2)``.
        dataset: has ``bounds``, ``sample(n)``, ``log_prob((n, 2)) -> (n,)`` and ``name``.
        path: image file to write (format from its suffix, e.g. ``.png``).
        resolution: cells per axis of the density grids.
        n_samples: samples drawn from the data and from the model for the lower panels.
        solver: passed to ``model.log_prob`` as ``solver=`` (default: the model's own).

    Returns:
        ``{"path": str, "model_mass": float, "true_mass": float, "cross_entropy_nats": float,
        "true_entropy_nats": float}``; the last two are grid estimates over the window.
    """
    bounds = float(dataset.bounds)
    dtype, device = _dtype_device(model)
    with _eval_mode(model), torch.no_grad():
        data = dataset.sample(n_samples)
        _, _, true_logp = grid_log_prob(
            dataset.log_prob, bounds, resolution, dtype=data.dtype, device=data.device
        )

        def model_log_prob(x: torch.Tensor) -> torch.Tensor:
            return model.log_prob(x) if solver is None else model.log_prob(x, solver=solver)

        _, _, model_logp = grid_log_prob(
            model_log_prob, bounds, resolution, dtype=dtype, device=device
        )
        samples = model.sample((n_samples,))

    cell_area = (2.0 * bounds / resolution) ** 2
    true_p, model_p = np.exp(true_logp), np.exp(model_logp)
    model_mass, true_mass = grid_mass(model_logp, bounds), grid_mass(true_logp, bounds)
    support = true_p > 0
    cross_entropy = float(-(true_p[support] * model_logp[support]).sum() * cell_area)
    true_entropy = float(-(true_p[support] * true_logp[support]).sum() * cell_area)

    bins = min(resolution, 100)
    data_hist = _histogram_density(data, bounds, bins)
    sample_hist = _histogram_density(samples, bounds, bins)
    vmax = float(np.nanmax(true_p)) if np.isfinite(true_p).any() else None

    fig = _new_figure((9.0, 8.4), dpi=100, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True, sharey=True).ravel()
    panels = [
        (true_p, f"true density p(x)  (grid mass {true_mass:.4f})"),
        (model_p, f"model density q(x)  (grid mass {model_mass:.4f})"),
        (data_hist, f"data samples: histogram, n = {_count(data)}"),
        (sample_hist, f"model samples: histogram, n = {_count(samples)}"),
    ]
    extent = (-bounds, bounds, -bounds, bounds)
    for ax, (image, title) in zip(axes, panels, strict=True):
        shown = ax.imshow(
            image, origin="lower", extent=extent, cmap="viridis", vmin=0.0, vmax=vmax,
            interpolation="nearest", aspect="equal",
        )
        ax.set_title(title, fontsize=10)
    for ax in axes[2:]:
        ax.set_xlabel("x1")
    for ax in axes[::2]:
        ax.set_ylabel("x2")
    fig.colorbar(shown, ax=list(axes), shrink=0.6, label="density per unit area (shared scale)")
    name = getattr(dataset, "name", "data")
    fig.suptitle(
        f"{name}: model mass on the {2 * bounds:g} x {2 * bounds:g} window = {model_mass:.4f} "
        f"(should be ~1)\ncross-entropy {cross_entropy:.3f} nats vs true entropy "
        f"{true_entropy:.3f} nats (KL {cross_entropy - true_entropy:.3f} nats, grid estimates)",
        fontsize=11,
    )
    out = _save(fig, path)
    return {
        "path": str(out),
        "model_mass": model_mass,
        "true_mass": true_mass,
        "cross_entropy_nats": cross_entropy,
        "true_entropy_nats": true_entropy,
    }


def plot_samples(
    samples: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    bounds: float,
    title: str,
) -> Path:
    """Scatter plot of 2-D samples ``(n, 2)`` on the window ``[-bounds, bounds]^2``."""
    points = _to_numpy(samples)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected samples of shape (n, 2), got {tuple(points.shape)}")
    inside = int((np.abs(points) <= bounds).all(axis=1).sum())
    fig = _new_figure((5.0, 5.0), dpi=100)
    ax = fig.subplots()
    size = 1.0 if len(points) > 5000 else 4.0
    ax.scatter(points[:, 0], points[:, 1], s=size, alpha=0.5, linewidths=0, color="tab:blue")
    ax.set_xlim(-bounds, bounds)
    ax.set_ylim(-bounds, bounds)
    ax.set_aspect("equal")
    ax.set_xlabel("x1")
    ax.set_ylabel("x2")
    ax.set_title(f"{title}\nn = {len(points)} samples, {inside} inside the window", fontsize=10)
    return _save(fig, path)


def plot_training_curves(
    log_records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    entropy: float | None = None,
) -> Path:
    """NLL (nats) against wall-clock seconds, and NFE against step, from training-log records.

    Records are the dicts of the training log's JSON lines. Keys used when present: ``step``,
    ``seconds``, ``nll``, ``val_nll``, ``nfe_forward``, ``nfe_backward``; a record lacking a key
    (or holding a non-finite or non-numeric value there) is skipped for that curve only. With
    no ``seconds`` anywhere, NLL is drawn against ``step`` (or the record index). ``entropy``,
    the true entropy H of the data in nats, is drawn as a horizontal line: the lowest NLL any
    model can reach in expectation.
    """
    records = [r for r in log_records if isinstance(r, Mapping)]
    time_key = next((k for k in ("seconds", "step") if _has(records, k)), None)
    step_key = "step" if _has(records, "step") else None
    fig = _new_figure((11.0, 4.2), dpi=100, layout="constrained")
    ax_nll, ax_nfe = fig.subplots(1, 2)

    drawn = False
    for key, label, style in (("nll", "train NLL", "-"), ("val_nll", "validation NLL", "o-")):
        xs, ys = _series(records, time_key, key)
        if xs:
            ax_nll.plot(xs, ys, style, label=label, markersize=3)
            drawn = True
    if entropy is not None and math.isfinite(entropy):
        ax_nll.axhline(entropy, color="black", linestyle="--", label="true entropy H")
        drawn = True
    ax_nll.set_xlabel(_AXIS_LABELS[time_key])
    ax_nll.set_ylabel("NLL [nats]")
    title = "negative log-likelihood"
    if entropy is not None and math.isfinite(entropy):
        title += f" (H = {entropy:.3f} nats)"
    ax_nll.set_title(title, fontsize=10)
    if drawn:
        ax_nll.legend(fontsize=8)
    else:
        _empty_note(ax_nll, "no NLL in the records")

    drawn = False
    for key, label in (("nfe_forward", "forward NFE"), ("nfe_backward", "backward NFE")):
        xs, ys = _series(records, step_key, key)
        if xs:
            ax_nfe.plot(xs, ys, label=label)
            drawn = True
    ax_nfe.set_xlabel(_AXIS_LABELS[step_key])
    ax_nfe.set_ylabel("function evaluations per step [NFE]")
    ax_nfe.set_title("solver cost", fontsize=10)
    if drawn:
        ax_nfe.legend(fontsize=8)
    else:
        _empty_note(ax_nfe, "no NFE in the records")
    return _save(fig, path)


# -- helpers ------------------------------------------------------------------------------------
def _new_figure(
    figsize: tuple[float, float], dpi: float, layout: str | None = None
) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


@contextmanager
def _eval_mode(model: Any):
    """Put a module in eval mode (tight eval solver, exact divergence) and restore it after."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def _dtype_device(model: Any) -> tuple[torch.dtype, torch.device]:
    params = getattr(model, "parameters", None)
    for tensor in params() if params is not None else ():
        return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _to_numpy(points: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(points, torch.Tensor):
        return points.detach().to("cpu", torch.float64).numpy()
    return np.asarray(points, dtype=np.float64)


def _count(points: torch.Tensor | np.ndarray) -> int:
    return int(points.shape[0])


def _histogram_density(points: torch.Tensor | np.ndarray, bounds: float, bins: int) -> np.ndarray:
    """Sample histogram as a density estimate: counts / (n * cell area), rows are y."""
    array = _to_numpy(points)
    counts, _, _ = np.histogram2d(
        array[:, 0], array[:, 1], bins=bins, range=[[-bounds, bounds], [-bounds, bounds]]
    )
    cell_area = (2.0 * bounds / bins) ** 2
    return counts.T / (max(len(array), 1) * cell_area)


def _number(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _has(records: list[Mapping[str, Any]], key: str) -> bool:
    return any(_number(r, key) is not None for r in records)


_AXIS_LABELS = {"seconds": "wall-clock time [s]", "step": "step", None: "log record index"}


def _series(
    records: list[Mapping[str, Any]], x_key: str | None, y_key: str
) -> tuple[list[float], list[float]]:
    """Points (x, y) of the records holding both numbers; x is the record index if x_key is None."""
    xs, ys = [], []
    for index, record in enumerate(records):
        y = _number(record, y_key)
        x = float(index) if x_key is None else _number(record, x_key)
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
