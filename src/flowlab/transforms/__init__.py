"""Bijections with log-determinants: the pieces discrete flows are made of.

``forward`` maps data to noise everywhere (see :mod:`flowlab.transforms.base`).
"""

# the modules below register their conformance examples on import
from flowlab.transforms import (  # noqa: F401
    autoregressive,
    coupling,
    linear,
    planar,
    reshape,
    revnet,
    splines,
)
from flowlab.transforms.base import (
    EXAMPLES,
    Compose,
    Example,
    Inverse,
    Transform,
    register_example,
)

__all__ = ["EXAMPLES", "Compose", "Example", "Inverse", "Transform", "register_example"]
