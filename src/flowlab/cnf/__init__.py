"""Continuous normalizing flows: vector fields, divergences, augmented dynamics, CNF blocks."""

from flowlab.cnf.block import CNF, CNFOutput
from flowlab.cnf.divergence import (
    PROBES,
    divergence_exact,
    divergence_hutchinson,
    sample_probe,
)
from flowlab.cnf.dynamics import DIVERGENCES, AugmentedDynamics
from flowlab.cnf.nets import ACTIVATIONS, LAYERS, MLPVectorField

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "CNFOutput",
    "DIVERGENCES",
    "LAYERS",
    "PROBES",
    "AugmentedDynamics",
    "MLPVectorField",
    "divergence_exact",
    "divergence_hutchinson",
    "sample_probe",
]
