"""Continuous normalizing flows: vector fields, divergences, augmented dynamics, CNF blocks."""

from flowlab.cnf.block import CNF, CNFOutput
from flowlab.cnf.conv import CONV_LAYERS, ConcatSquashConv2d, ConvVectorField
from flowlab.cnf.divergence import (
    PROBES,
    divergence_exact,
    divergence_hutchinson,
    sample_probe,
)
from flowlab.cnf.dynamics import DIVERGENCES, AugmentedDynamics
from flowlab.cnf.nets import ACTIVATIONS, LAYERS, FourierVectorField, MLPVectorField

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "CONV_LAYERS",
    "CNFOutput",
    "DIVERGENCES",
    "LAYERS",
    "PROBES",
    "AugmentedDynamics",
    "ConcatSquashConv2d",
    "ConvVectorField",
    "FourierVectorField",
    "MLPVectorField",
    "divergence_exact",
    "divergence_hutchinson",
    "sample_probe",
]
