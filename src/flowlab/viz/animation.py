"""GIF animations of a 2-D continuous flow carrying Gaussian samples to data (and back).

Direction convention (flowlab's): a CNF block integrates **data -> noise** from ``t = 0`` to
``t = T``, and sampling runs the blocks in reverse order, each from ``T`` back to 0. Going
noise -> data the particles therefore move along ``-f(t, z)``; going data -> noise along
``+f(t, z)``. The arrows drawn are always the direction of motion shown in that frame.

Frames are rendered off-screen on an Agg canvas (no pyplot) and written with Pillow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flowlab.viz.density import _dtype_device, _eval_mode, _new_figure


def frame_schedule(model: Any, frames_per_block: int) -> list[tuple[int, float]]:
    """``(block index, block time t)`` of each frame of ``model.trajectory(z, K, to_data=True)``.

    Frame 0 is the noise, at time ``T`` of the last block; block ``b`` (taken in reverse order)
    then contributes ``K`` frames at times ``T_b * (K - 1) / K, ..., T_b / K, 0``.
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    blocks = list(model.blocks)
    schedule = [(len(blocks) - 1, float(blocks[-1].T.detach()))]
    for index in reversed(range(len(blocks))):
        T = float(blocks[index].T.detach())
        for j in range(1, frames_per_block + 1):
            schedule.append((index, T * (1.0 - j / frames_per_block)))
    return schedule


def motion_field(
    model: Any, block_index: int, t: float, points: torch.Tensor, to_data: bool = True
) -> torch.Tensor:
    """Velocity ``(n, 2)`` of particles at ``points`` at time ``t`` of a block, no grad.

    ``-f(t, z)`` when flowing noise -> data (time runs from ``T`` down to 0), ``+f(t, z)`` when
    flowing data -> noise.
    """
    block = model.blocks[block_index]
    with torch.no_grad():
        velocity = block.field(torch.tensor(t, dtype=points.dtype, device=points.device), points)
    return -velocity if to_data else velocity


def animate_flow(
    model: Any,
    path: str | os.PathLike,
    n: int = 2000,
    frames_per_block: int = 30,
    bounds: float = 4.0,
    fps: float = 15,
    round_trip: bool = True,
    show_field: bool = True,
    *,
    solver: Any = None,
    generator: torch.Generator | None = None,
    field_grid: int = 15,
    dpi: float = 80,
) -> Path:
    """Write a GIF of ``n`` base samples flowing from the Gaussian to the data (and back).

    The positions come from one ``model.trajectory(z, frames_per_block, to_data=True)`` solve
    (``1 + frames_per_block * len(model.blocks)`` frames); with ``round_trip`` the frames are
    played again backwards to the noise, excluding the repeated data frame, for
    ``2 * (1 + frames_per_block * len(model.blocks)) - 1`` frames in all. With ``show_field``
    each frame also shows the velocity field of the current block at the current time on a
    ``field_grid x field_grid`` grid, pointing along the motion of that frame (see the module
    docstring), all frames on one arrow scale. Each frame is labelled with its direction, block,
    ODE time ``t`` and frame number. The noise and data frames are held a little longer.

    Args:
        model: a flow with ``trajectory``, ``blocks`` (each with ``.T`` and ``.field(t, z)``)
            and 2-D events.
        path: the GIF file to write.
        n: number of particles.
        frames_per_block: time steps per block.
        bounds: the window is ``[-bounds, bounds]^2``.
        fps: frames per second of playback.
        solver: ODE solver of the trajectory (default: the model's ``eval_solver``).
        generator: seeds the base samples.
        field_grid: arrows per axis.
        dpi: the figure is 4 x 4 inches, so 320 x 320 pixels at the default 80 dpi.

    Returns:
        the path written.
    """
    if n < 1 or fps <= 0 or bounds <= 0:
        raise ValueError(f"need n >= 1, fps > 0 and bounds > 0; got {n}, {fps}, {bounds}")
    dtype, device = _dtype_device(model)
    schedule = frame_schedule(model, frames_per_block)
    num_blocks = len(model.blocks)
    with _eval_mode(model), torch.no_grad():
        z = torch.randn((n, 2), generator=generator, dtype=dtype, device=device)
        positions = model.trajectory(z, frames_per_block, to_data=True, solver=solver)
    if positions.shape[0] != len(schedule):
        raise ValueError(
            f"trajectory returned {positions.shape[0]} frames, expected {len(schedule)}"
        )
    positions = positions.detach().to("cpu", torch.float64).numpy()

    # (frame index into positions, to_data) in playback order.
    order = [(k, True) for k in range(len(schedule))]
    if round_trip:
        order += [(k, False) for k in range(len(schedule) - 2, -1, -1)]

    axis = np.linspace(-bounds, bounds, field_grid + 2)[1:-1]
    grid_x, grid_y = np.meshgrid(axis, axis)
    grid = torch.as_tensor(np.stack([grid_x.ravel(), grid_y.ravel()], 1), dtype=dtype)
    grid = grid.to(device)
    velocities = None
    scale = 1.0
    if show_field:
        # The noise -> data velocity of each frame; the data -> noise one is its negative.
        velocities = np.stack([
            motion_field(model, b, t, grid, to_data=True).to("cpu", torch.float64).numpy()
            for b, t in schedule
        ])
        speed = np.linalg.norm(velocities, axis=-1)
        typical = float(np.nanpercentile(speed, 95)) if np.isfinite(speed).any() else 0.0
        spacing = axis[1] - axis[0] if len(axis) > 1 else bounds
        # Arrow lengths in data units: a typical (95th-percentile) speed spans 0.9 cells.
        scale = typical / (0.9 * spacing) if typical > 0 else 1.0

    fig = _new_figure((4.0, 4.0), dpi=dpi)
    ax = fig.add_axes((0.1, 0.07, 0.86, 0.78))
    ax.set_xlim(-bounds, bounds)
    ax.set_ylim(-bounds, bounds)
    ax.set_aspect("equal")
    ax.set_xticks([-bounds, 0, bounds])
    ax.set_yticks([-bounds, 0, bounds])
    ax.tick_params(labelsize=7)
    quiver = None
    if velocities is not None:
        quiver = ax.quiver(
            grid_x, grid_y, velocities[0, :, 0], velocities[0, :, 1], angles="xy",
            scale_units="xy", scale=scale, color="0.55", width=0.004, zorder=1,
        )
    scatter = ax.scatter(
        positions[0, :, 0], positions[0, :, 1], s=2.0 if n > 1000 else 4.0, color="tab:blue",
        linewidths=0, zorder=2,
    )
    label = fig.text(0.5, 0.97, "", ha="center", va="top", fontsize=8)

    frames = []
    for number, (k, to_data) in enumerate(order, start=1):
        block, t = schedule[k]
        scatter.set_offsets(positions[k])
        if quiver is not None:
            sign = 1.0 if to_data else -1.0
            quiver.set_UVC(sign * velocities[k, :, 0], sign * velocities[k, :, 1])
        direction = "noise -> data" if to_data else "data -> noise"
        label.set_text(
            f"{direction}: block {block + 1}/{num_blocks}, t = {t:.3f} "
            f"(of T = {float(model.blocks[block].T.detach()):.3f})\n"
            f"frame {number}/{len(order)}, n = {n} particles"
            + (", arrows: velocity of motion" if quiver is not None else "")
        )
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        frames.append(Image.fromarray(rgb).quantize(colors=16))

    frame_ms = max(int(round(1000.0 / fps)), 20)
    durations = [frame_ms] * len(frames)
    data_frame = len(schedule) - 1
    durations[0] = max(frame_ms, 500)
    durations[data_frame] = max(frame_ms, 800)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(
        out, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0
    )
    return out
