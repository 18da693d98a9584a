"""Conditioner and backbone networks for the discrete flows."""

from flowlab.nets.made import MADE
from flowlab.nets.mlp import ACTIVATIONS, MLP, with_context
from flowlab.nets.unet import UNetVectorField

__all__ = ["ACTIVATIONS", "MADE", "MLP", "UNetVectorField", "with_context"]
