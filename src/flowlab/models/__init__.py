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
from flowlab.models.cnf_density import CNFDensity
from flowlab.models.dequantization import VariationalDequantization
from flowlab.models.ffjord import FFJORD
from flowlab.models.flows import FAMILIES, Flow, register_family
from flowlab.models.multiscale import MultiscaleFFJORD

__all__ = [
    "CFM",
    "CNFDensity",
    "FAMILIES",
    "FFJORD",
    "MODELS",
    "MultiscaleFFJORD",
    "Flow",
    "DensityModel",
    "LossOutput",
    "build_model",
    "register_family",
    "register_model",
    "standard_normal_log_prob",
    "VariationalDequantization",
]
