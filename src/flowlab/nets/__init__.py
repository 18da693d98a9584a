"""Conditioner and backbone networks for the discrete flows."""

from flowlab.nets.made import MADE
from flowlab.nets.mlp import ACTIVATIONS, MLP, with_context

__all__ = ["ACTIVATIONS", "MADE", "MLP", "with_context"]
