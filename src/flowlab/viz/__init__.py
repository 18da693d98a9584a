"""Plots and animations: density heat maps, samples, training curves and flow GIFs of 2-D
flows; image grids, image flow GIFs with the vector field, and base-space interpolations.

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
from flowlab.viz.image_flow import (
    FlowFrames,
    ImageFlowResult,
    Interpolation,
    animate_images,
    choose_pairs,
    flow_frames,
    has_vector_field,
    interpolate_images,
    slerp,
)
from flowlab.viz.images import save_image_grid

__all__ = [
    "FlowFrames",
    "ImageFlowResult",
    "Interpolation",
    "animate_flow",
    "animate_images",
    "choose_pairs",
    "flow_frames",
    "frame_schedule",
    "has_vector_field",
    "interpolate_images",
    "grid_log_prob",
    "grid_mass",
    "motion_field",
    "plot_density_comparison",
    "plot_samples",
    "plot_training_curves",
    "save_image_grid",
    "slerp",
]
