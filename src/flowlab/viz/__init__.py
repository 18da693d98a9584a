"""Plots and animations of 2-D flows: density heat maps, samples, training curves, flow GIFs.

Rendering is off-screen (matplotlib Agg on figures of its own, no pyplot, no global backend
change). The core never imports this package; it imports the core.
"""

from flowlab.viz.animation import animate_flow, frame_schedule, motion_field
from flowlab.viz.density import (
    grid_log_prob,
    grid_mass,
    plot_density_comparison,
    plot_samples,
    plot_training_curves,
)
from flowlab.viz.images import save_image_grid

__all__ = [
    "animate_flow",
    "frame_schedule",
    "grid_log_prob",
    "grid_mass",
    "motion_field",
    "plot_density_comparison",
    "plot_samples",
    "plot_training_curves",
    "save_image_grid",
]
