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
from flowlab.models.flows import FAMILIES, Flow, register_family

__all__ = [
    "CFM",
    "FAMILIES",
    "FFJORD",
    "MODELS",
    "Flow",
    "DensityModel",
    "LossOutput",
    "build_model",
    "register_family",
    "register_model",
    "standard_normal_log_prob",
]
