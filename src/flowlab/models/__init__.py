"""Assembled density models, registered by name."""

from flowlab.models.base import (
    MODELS,
    DensityModel,
    LossOutput,
    build_model,
    register_model,
    standard_normal_log_prob,
)
from flowlab.models.cfm import CFM
from flowlab.models.ffjord import FFJORD

__all__ = [
    "CFM",
    "FFJORD",
    "MODELS",
    "DensityModel",
    "LossOutput",
    "build_model",
    "register_model",
    "standard_normal_log_prob",
]
