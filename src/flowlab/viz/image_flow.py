"""Pictures of a flow on images: test images carried to noise and back by a CNF (a GIF with
the vector field beside the states), and interpolations between images in the base space.

Direction (flowlab's, as everywhere): a CNF block integrates **data -> noise** from ``t = 0``
to ``t = T``; the way back runs the blocks in reverse order, each from ``T`` down to 0. A
particle going to noise moves along ``+f(t, z)``, one coming back along ``-f(t, z)``. The
velocity panels of the GIF always show the velocity of the motion in that frame.

What the GIF frames are: the images are preprocessed once with fixed dequantization noise
(:meth:`ImageTask.to_model`), pushed data -> noise by one ODE solve saved at a grid of times,
then the noise is **integrated back** noise -> data by a second solve (not the first one
played backwards), so the last frame is a true reconstruction and its error measures how
invertible the solved map is. Every state is drawn through the inverse of the preprocessing
(sigmoid of the logit space, clipped to ``[0, 1]``); for the intermediate frames this is only
a display map: they are states of the ODE, not images of the data distribution, and the noise
frame is a standard normal draw seen through a sigmoid.

How a model provides its states: :func:`flow_frames`. A stack of CNF blocks (FFJORD, CFM:
``model.blocks[i].field(t, z)``, ``.T`` and ``model.trajectory``) is handled here. A model
whose state changes shape along the flow (a multiscale CNF with squeeze and factor-out)
provides a method ``flow_frames(x, steps_per_block, *, to_data, solver)`` returning a
:class:`FlowFrames` (or the tuple ``(states, velocities, times)``) whose states have the
shape of its input ``x`` (the model's ``event_shape``) and read as the image when reshaped
to ``(C, H, W)`` (e.g. un-squeezed, the factored-out channels frozen from the moment they
leave, with velocity zero); the last state of a ``to_data=False`` call is what a
``to_data=True`` call starts from. Discrete flows (RealNVP, Glow, MAF, ...) have no vector
field and get a clear error naming that the GIF needs a CNF.

Rendering is off-screen (a matplotlib Agg canvas of its own, no pyplot); Pillow writes the GIF.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from flowlab.errors import ConfigError, DataError
from flowlab.models.ffjord import FFJORD
from flowlab.viz.animation import frame_schedule
from flowlab.viz.density import _dtype_device, _eval_mode, _new_figure
from flowlab.viz.images import save_image_grid

Progress = Callable[[str], None]


# -- states along the flow --------------------------------------------------------------------
@dataclass
class FlowFrames:
    """States along a flow and the velocity of their motion.

    Attributes:
        states: ``(frames, batch, ...)``, frame 0 being the starting points; each state holds
            as many numbers as one data point (``D`` for images).
        velocities: the same shape: ``dz/ds`` along the direction of travel at each frame
            (``+f(t, z)`` going to noise, ``-f(t, z)`` going to data).
        times: per frame, ``(block index, t, T of that block)``.
    """

    states: torch.Tensor
    velocities: torch.Tensor
    times: list[tuple[int, float, float]]


def has_vector_field(model: Any) -> bool:
    """Whether ``model`` is a CNF: CNF blocks (each with ``.field(t, z)`` and ``.T``) or its
    own ``flow_frames``. Discrete flows (RealNVP, Glow, MAF, ...) are not."""
    if callable(getattr(model, "flow_frames", None)):
        return True
    blocks = getattr(model, "blocks", None)
    return (blocks is not None and len(blocks) > 0
            and all(hasattr(b, "field") and hasattr(b, "T") for b in blocks))


def _require_vector_field(model: Any, what: str) -> None:
    if not has_vector_field(model):
        name = getattr(model, "name", type(model).__name__)
        raise ConfigError(
            f"{what} needs a CNF (a model with a vector field, e.g. ffjord or cfm); {name} is "
            "a discrete flow with no vector field to show (interpolate_images works for it)"
        )


def flow_frames(
    model: Any,
    x: torch.Tensor,
    steps_per_block: int,
    *,
    to_data: bool,
    solver: Any = None,
) -> FlowFrames:
    """The states of ``x`` along the flow, ``steps_per_block`` time steps in each block, and
    the velocity of the motion at each frame (no gradients).

    ``to_data=False`` starts from data ``x`` and goes to noise (block 0 first, ``t: 0 -> T``);
    ``to_data=True`` starts from noise and goes to data. For a stack of CNF blocks there are
    ``1 + steps_per_block * len(model.blocks)`` frames from one ``model.trajectory`` solve.
    A model with its own ``flow_frames`` method is asked instead (see the module docstring).

    Raises:
        ConfigError: the model has no vector field (a discrete flow), or its trajectory does
            not have the frames and shapes expected.
    """
    if steps_per_block < 1:
        raise ConfigError(f"steps_per_block must be >= 1, got {steps_per_block}")
    _require_vector_field(model, "following the flow frame by frame")
    hook = getattr(model, "flow_frames", None)
    with torch.no_grad():
        if callable(hook):
            out = hook(x, steps_per_block, to_data=to_data, solver=solver)
            frames = out if isinstance(out, FlowFrames) else FlowFrames(*out)
            frames.times = [(int(b), float(t), float(T)) for b, t, T in frames.times]
        elif callable(getattr(model, "trajectory", None)):
            frames = _cnf_stack_frames(model, x, steps_per_block, to_data, solver)
        else:
            raise ConfigError(f"{getattr(model, 'name', type(model).__name__)} is a CNF without "
                              "a trajectory: give it flow_frames(x, steps_per_block, "
                              "to_data=..., solver=...) (see flowlab.viz.image_flow)")
    n = frames.states.shape[0]
    if frames.velocities.shape != frames.states.shape or len(frames.times) != n \
            or frames.states.shape[1] != x.shape[0] \
            or frames.states[0].numel() != x.numel():
        raise ConfigError(
            f"{getattr(model, 'name', 'the model')}'s flow frames do not fit {tuple(x.shape)} "
            f"inputs: states {tuple(frames.states.shape)}, velocities "
            f"{tuple(frames.velocities.shape)}, {len(frames.times)} times"
        )
    return frames


def _cnf_stack_frames(model: Any, x: torch.Tensor, steps: int, to_data: bool,
                      solver: Any) -> FlowFrames:
    blocks = list(model.blocks)
    if to_data:
        schedule = frame_schedule(model, steps)
    else:
        schedule = [(0, 0.0)]
        for index, block in enumerate(blocks):
            T = float(block.T.detach())
            schedule += [(index, T * j / steps) for j in range(1, steps + 1)]
    states = model.trajectory(x, steps, to_data=to_data, solver=solver)
    expected = (len(schedule), *x.shape)
    if not isinstance(states, torch.Tensor) or tuple(states.shape) != expected:
        got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
        raise ConfigError(
            f"{getattr(model, 'name', 'the model')}.trajectory returned {got}, expected "
            f"{expected}; a model whose state changes shape along the flow must provide "
            "flow_frames(x, steps_per_block, to_data=..., solver=...)"
        )
    sign = -1.0 if to_data else 1.0
    velocities = torch.stack([
        sign * blocks[b].field(torch.tensor(t, dtype=x.dtype, device=x.device), states[k])
        for k, (b, t) in enumerate(schedule)
    ])
    times = [(b, t, float(blocks[b].T.detach())) for b, t in schedule]
    return FlowFrames(states, velocities, times)


# -- the GIF ----------------------------------------------------------------------------------
@dataclass
class ImageFlowResult:
    """What :func:`animate_images` wrote and measured.

    Attributes:
        path: the GIF.
        num_frames: frames in the GIF: ``2 * S + 1`` for ``S`` time steps each way.
        data: ``(N, *event_shape)`` the preprocessed input images (model space).
        noise: their image under the data -> noise solve.
        reconstruction: ``noise`` integrated back noise -> data.
        max_error: ``max |reconstruction - data|`` in model space (logit units).
        pixels_changed: pixel values that differ after the round trip (of ``N * D``).
    """

    path: Path
    num_frames: int
    data: torch.Tensor
    noise: torch.Tensor
    reconstruction: torch.Tensor
    max_error: float
    pixels_changed: int


def display_intensity(task: Any, states: torch.Tensor) -> np.ndarray:
    """Model-space states ``(N, ...)`` -> intensities ``(N, C, H, W)`` in ``[0, 1]``: the
    inverse of the preprocessing, clipped (a display map only for points that are not data)."""
    y = states.detach().to("cpu", torch.float64).reshape(states.shape[0], *task.image_shape)
    alpha = task.preprocess.alpha
    if alpha is not None:
        y = (torch.sigmoid(y) - alpha) / (1.0 - 2.0 * alpha)
    return y.clamp(0.0, 1.0).numpy()


def _tile(images: np.ndarray, columns: int, gap_value: float) -> np.ndarray:
    """``(N, C, H, W)`` -> one ``(rows*(H+1)+1, columns*(W+1)+1, C)`` canvas, one-pixel gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), gap_value)
    for i in range(n):
        r, k = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h,
               1 + k * (w + 1):1 + k * (w + 1) + w] = images[i].transpose(1, 2, 0)
    return canvas


def animate_images(
    model: Any,
    task: Any,
    pixels: torch.Tensor,
    path: str | os.PathLike,
    frames_per_block: int = 20,
    *,
    solver: Any = None,
    seed: int = 0,
    fps: float = 10,
    columns: int | None = None,
    dpi: float = 80,
    progress: Progress | None = None,
) -> ImageFlowResult:
    """Write a GIF of images carried data -> noise by a CNF and integrated back to data.

    Each frame shows the batch as a grid of states (left) and, for each image, the velocity of
    the motion at that frame as a per-pixel diverging map on one colour scale for the whole
    GIF (right; for colour images the mean over channels), with the direction, block, ODE time
    and frame number above. There are ``S = frames_per_block * len(model.blocks)`` time steps
    each way and ``2 S + 1`` frames; the data, noise and reconstruction frames are held longer.

    Args:
        model: a CNF (see :func:`flow_frames`); its train/eval mode is restored afterwards.
        task: the :class:`~flowlab.data.image_task.ImageTask` of the run (preprocessing, shapes).
        pixels: ``(N, C, H, W)`` integer test images, e.g. 16 of them.
        path: the GIF file to write.
        frames_per_block: time steps per block in each direction.
        solver: ODE solver of both solves (default: the model's ``eval_solver``).
        seed: seeds the dequantization noise of the inputs (fixed, so runs are comparable).
        fps: frames per second of playback.
        columns: images per row of each grid (default: about a square).
        dpi: the figure is 7.2 x 3.9 inches: 576 x 312 pixels at the default 80 dpi.
        progress: called with a line of text before each slow part (e.g. ``print``).

    Returns:
        an :class:`ImageFlowResult` with the round-trip error.

    Raises:
        ConfigError: the model has no vector field (the GIF needs a CNF), or bad options.
        DataError: pixels of the wrong shape or range.
    """
    _require_vector_field(model, "the flow GIF")
    if frames_per_block < 1 or fps <= 0:
        raise ConfigError(f"need frames_per_block >= 1 and fps > 0, got {frames_per_block}, "
                          f"{fps}")
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != tuple(task.image_shape) \
            or pixels.shape[0] < 1:
        raise DataError(f"expected (N, {', '.join(map(str, task.image_shape))}) images, got "
                        f"{tuple(pixels.shape)}")
    say = progress or (lambda _: None)
    dtype, device = _dtype_device(model)
    n = pixels.shape[0]
    generator = torch.Generator().manual_seed(seed)
    x = task.to_model(pixels.cpu(), generator, dtype=dtype)[0].to(device)
    with _eval_mode(model), torch.no_grad():
        say(f"flow GIF: solving {n} images data -> noise")
        forward = flow_frames(model, x, frames_per_block, to_data=False, solver=solver)
        noise = forward.states[-1]
        say("flow GIF: integrating the noise back noise -> data")
        backward = flow_frames(model, noise, frames_per_block, to_data=True, solver=solver)
    reconstruction = backward.states[-1]
    error = float((reconstruction - x).abs().max())
    decoded = task.to_pixels(reconstruction).cpu().to(torch.int64)
    changed = int((decoded != pixels.cpu().to(torch.int64)).sum())
    steps = forward.states.shape[0] - 1

    # Playback: frames of the forward solve, then those of the backward solve past its start.
    states = torch.cat([forward.states, backward.states[1:]]).reshape(-1, n, *task.image_shape)
    velocities = torch.cat([forward.velocities, backward.velocities[1:]])
    velocities = velocities.detach().to("cpu", torch.float64).reshape(states.shape)
    velocities = velocities.mean(dim=2, keepdim=True).numpy()  # one value per pixel
    times = forward.times + backward.times[1:]
    blocks = getattr(model, "blocks", None)
    num_blocks = len(blocks) if blocks is not None else 1 + max(b for b, _, _ in times)
    finite = np.abs(velocities[np.isfinite(velocities)])
    vmax = float(np.percentile(finite, 99)) if finite.size else 0.0
    vmax = vmax if vmax > 0 else 1.0
    columns = columns or math.ceil(math.sqrt(n))

    say(f"flow GIF: rendering {len(times)} frames")
    fig = _new_figure((7.2, 3.9), dpi=dpi)
    ax_state = fig.add_axes((0.01, 0.09, 0.44, 0.74))
    ax_field = fig.add_axes((0.46, 0.09, 0.44, 0.74))
    ax_bar = fig.add_axes((0.905, 0.16, 0.015, 0.6))
    for ax in (ax_state, ax_field):
        ax.set_axis_off()
    channels = task.image_shape[0]
    first = _tile(display_intensity(task, states[0]), columns, 0.35)
    state_image = ax_state.imshow(
        first[..., 0] if channels == 1 else first, cmap="gray", vmin=0.0, vmax=1.0,
        interpolation="nearest",
    )
    field_image = ax_field.imshow(
        _tile(velocities[0], columns, np.nan)[..., 0], vmin=-vmax, vmax=vmax,
        cmap=colormaps["RdBu_r"].with_extremes(bad="0.55"), interpolation="nearest",
    )
    bar = fig.colorbar(field_image, cax=ax_bar)
    bar.ax.tick_params(labelsize=6)
    units = "logit units" if task.preprocess.alpha is not None else "intensity"
    bar.set_label(f"{units} per unit time", fontsize=6)
    ax_state.set_title("states z(t), shown through the inverse logit", fontsize=7)
    ax_field.set_title("velocity of the motion dz/dt, per pixel", fontsize=7)
    header = fig.text(0.5, 0.985, "", ha="center", va="top", fontsize=8.5)
    footer = fig.text(0.5, 0.015, "", ha="center", va="bottom", fontsize=7)

    # Blitting: draw the still parts once, then only the two images and two texts per frame.
    dynamic = (state_image, field_image, header, footer)
    for artist in dynamic:
        artist.set_animated(True)
    canvas = fig.canvas
    canvas.draw()
    background = canvas.copy_from_bbox(fig.bbox)

    rgb_frames = []
    total = len(times)
    for k, (block, t, T) in enumerate(times):
        to_data = k > steps
        tile = _tile(display_intensity(task, states[k]), columns, 0.35)
        state_image.set_data(tile[..., 0] if channels == 1 else tile)
        field_image.set_data(_tile(velocities[k], columns, np.nan)[..., 0])
        direction = "noise -> data (integrated back)" if to_data else "data -> noise"
        if k == 0:
            direction = "test images (dequantized)"
        header.set_text(f"{direction}\nblock {block + 1}/{num_blocks}, "
                        f"t = {t:.3f} of T = {T:.3f}   frame {k + 1}/{total}")
        if k == 0:
            note = f"{n} test images; the flow runs data (t = 0) -> noise (t = T) and back"
        elif k == steps:
            note = "noise z(T): should look like N(0, I) seen through a sigmoid"
        elif k == total - 1:
            note = (f"reconstruction: max |x - x'| = {error:.2g} (model space), "
                    f"{changed} of {pixels.numel()} pixel values changed")
        else:
            note = "in between: states of the ODE, not images of the data distribution"
        footer.set_text(note)
        canvas.restore_region(background)
        for artist in dynamic:
            fig.draw_artist(artist)
        rgb_frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))

    frame_ms = max(int(round(1000.0 / fps)), 20)
    durations = [frame_ms] * total
    durations[0] = max(frame_ms, 1200)
    durations[steps] = max(frame_ms, 1000)
    durations[-1] = max(frame_ms, 2500)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_gif(rgb_frames, out, durations)
    return ImageFlowResult(out, total, x, noise, reconstruction, error, changed)


def _save_gif(frames: list[Image.Image], path: Path, durations: list[int]) -> None:
    """One shared 128-colour palette (no flicker between frames, no dithering: small files)."""
    sample = frames[:: max(1, len(frames) // 4)] + [frames[-1]]
    width, height = frames[0].size
    strip = Image.new("RGB", (width, height * len(sample)))
    for i, frame in enumerate(sample):
        strip.paste(frame, (0, i * height))
    palette = strip.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    indexed = [f.quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    indexed[0].save(path, format="GIF", save_all=True, append_images=indexed[1:],
                    duration=durations, loop=0, optimize=False)


# -- interpolations in the base space ---------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor,
          weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Spherical interpolation between the rows of ``a`` and ``b`` ``(N, ...)``:
    ``(N, S, ...)`` at the ``S`` weights ``w`` (0 gives ``a``, 1 gives ``b``).

    ``sin((1 - w) omega) / sin(omega) a + sin(w omega) / sin(omega) b`` with ``omega`` the
    angle between the flattened rows (Shoemake 1985; White 2016 for latent spaces). Why not a
    straight line: in ``D`` dimensions standard-normal draws lie near the sphere of radius
    ``sqrt(D)``, and the midpoint of two independent ones has norm about ``sqrt(D / 2)``, a
    point the base distribution almost never produces; the arc keeps the norm between the
    two endpoints' norms. Rows at (nearly) equal or opposite directions fall back to the
    straight line.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise DataError(f"slerp needs two (N, ...) batches of one shape, got {tuple(a.shape)} "
                        f"and {tuple(b.shape)}")
    w = torch.as_tensor(weights, dtype=a.dtype, device=a.device).reshape(1, -1, 1)
    fa, fb = a.flatten(1)[:, None], b.flatten(1)[:, None]
    cos = (fa * fb).sum(-1, keepdim=True) / (fa.norm(dim=-1, keepdim=True)
                                             * fb.norm(dim=-1, keepdim=True)).clamp_min(1e-30)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    curved = sin > 1e-6
    safe = torch.where(curved, sin, torch.ones_like(sin))
    ca = torch.where(curved, torch.sin((1.0 - w) * omega) / safe, 1.0 - w)
    cb = torch.where(curved, torch.sin(w * omega) / safe, w)
    return (ca * fa + cb * fb).reshape(a.shape[0], w.shape[1], *a.shape[1:])


@dataclass
class Interpolation:
    """What :func:`interpolate_images` wrote.

    Attributes:
        path: the PNG grid (rows = pairs, columns = weights).
        weights: ``(S,)`` from 0 to 1.
        latents: ``(P, S, *latent_shape)`` the interpolated noise (columns 0 and ``S - 1``
            are the two images' own latents).
        pixels: ``(P, S, C, H, W)`` the decoded integer images.
    """

    path: Path
    weights: torch.Tensor
    latents: torch.Tensor
    pixels: torch.Tensor


def _noise_of(model: Any, x: torch.Tensor, solver: Any) -> torch.Tensor:
    if isinstance(model, FFJORD):  # (and CFM) the solve of to_noise without its log|det|
        return model.trajectory(x, 1, to_data=False, solver=solver)[-1]
    if has_vector_field(model):
        # Only z is needed: a Hutchinson log|det| (one vector-Jacobian product per step, not
        # D of the exact divergence) rides along; it changes nothing in z but the step sizes.
        out = model.to_noise(x, solver=solver, divergence="hutchinson")
    else:
        out = model.to_noise(x, solver=solver) if solver is not None else model.to_noise(x)
    if hasattr(out, "z"):  # a CNF's FlowResult
        return out.z
    return out[0] if isinstance(out, tuple) else out  # a discrete flow's (z, log|det|)


def interpolate_images(
    model: Any,
    task: Any,
    a: torch.Tensor,
    b: torch.Tensor,
    steps: int,
    path: str | os.PathLike,
    *,
    method: str = "slerp",
    solver: Any = None,
    seed: int = 0,
    scale: int = 4,
) -> Interpolation:
    """Map pairs of images to noise, interpolate there, map back and save the grid as a PNG.

    ``a[i]`` and ``b[i]`` are preprocessed with fixed dequantization noise, mapped data ->
    noise by ``model.to_noise``, joined by ``steps`` points of a spherical (``slerp``, see
    :func:`slerp`) or straight (``linear``) path, and each point is mapped noise -> data by
    ``model.to_data``. Works for every flowlab model with both maps, whatever its noise shape
    (a multiscale flow's noise is flat): CNFs and discrete flows alike.

    Args:
        model: the flow; its train/eval mode is restored afterwards.
        task: the :class:`~flowlab.data.image_task.ImageTask` of the run.
        a, b: ``(P, C, H, W)`` (or one ``(C, H, W)``) integer images, the two ends of P rows.
        steps: columns of the grid, at least 2 (the two ends).
        path: the PNG file to write.
        method: ``slerp`` or ``linear``.
        solver: for a CNF, the ODE solver of both maps (default: the model's ``eval_solver``).
        seed: seeds the dequantization noise.
        scale: each pixel is drawn as ``scale x scale`` pixels.
    """
    if method not in ("slerp", "linear"):
        raise ConfigError(f"unknown interpolation {method!r}; choose slerp or linear")
    if steps < 2:
        raise ConfigError(f"steps must be >= 2 (the two ends), got {steps}")
    if not (callable(getattr(model, "to_noise", None)) and callable(getattr(model, "to_data",
                                                                            None))):
        raise ConfigError(f"interpolating needs a model with to_noise and to_data; "
                          f"{type(model).__name__} lacks one")
    a = a[None] if a.ndim == 3 else a
    b = b[None] if b.ndim == 3 else b
    if a.shape != b.shape or tuple(a.shape[1:]) != tuple(task.image_shape):
        raise DataError(f"expected two (P, {', '.join(map(str, task.image_shape))}) batches of "
                        f"images, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype, device = _dtype_device(model)
    pairs = a.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ends = task.to_model(torch.cat([a, b]).cpu(), generator, dtype=dtype)[0].to(device)
    weights = torch.linspace(0.0, 1.0, steps, dtype=dtype, device=device)
    kwargs = {} if solver is None else {"solver": solver}
    with _eval_mode(model), torch.no_grad():
        z = _noise_of(model, ends, solver)
        za, zb = z[:pairs], z[pairs:]
        if method == "slerp":
            latents = slerp(za, zb, weights)
        else:
            w = weights.reshape(1, -1, *([1] * (za.ndim - 1)))
            latents = (1.0 - w) * za[:, None] + w * zb[:, None]
        x = model.to_data(latents.reshape(pairs * steps, *za.shape[1:]), **kwargs)
    pixels = task.to_pixels(x).cpu()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(pixels, out, task.levels, columns=steps, scale=scale)
    return Interpolation(out, weights.cpu(), latents.cpu(),
                         pixels.reshape(pairs, steps, *task.image_shape))


def choose_pairs(labels: torch.Tensor, count: int, seed: int = 0) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Indices ``(first, second)`` of ``count`` pairs of distinct images with different labels
    where possible: ``first`` walks a seeded order of the images and each partner is the next
    image in that order with another label (so with all labels distinct, consecutive rows of
    an interpolation grid chain into one morph). The same seed gives the same pairs."""
    n = labels.shape[0]
    if n < 2:
        raise DataError(f"need at least 2 images to pair, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    first, second = [], []
    for i, start in enumerate(order[:count]):
        others = order[i + 1:] + order[:i]
        partner = next((j for j in others if int(labels[j]) != int(labels[start])), others[0])
        first.append(start)
        second.append(partner)
    return torch.tensor(first), torch.tensor(second)


__all__ = [
    "FlowFrames",
    "ImageFlowResult",
    "Interpolation",
    "animate_images",
    "choose_pairs",
    "display_intensity",
    "flow_frames",
    "has_vector_field",
    "interpolate_images",
    "slerp",
]
