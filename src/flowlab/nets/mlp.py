"""Multilayer perceptrons used as conditioners of coupling layers and as residual functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowlab.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


class MLP(nn.Sequential):
    """``dim_in -> hidden... -> dim_out`` with an activation between layers.

    ``zero_last`` starts the last layer at zero, so that a coupling layer built on it starts as
    the identity (stable at initialization; the conformance tests randomize it first).
    """

    def __init__(self, dim_in: int, dim_out: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "relu", zero_last: bool = True):
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        widths = [int(dim_in), *(int(h) for h in hidden), int(dim_out)]
        if any(w < 1 for w in widths[1:]) or widths[0] < 0:
            raise ConfigError(f"layer widths must be positive, got {widths}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        if zero_last:
            last = layers[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


def with_context(x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """The conditioner input: ``x`` with the context appended as extra features."""
    return x if context is None else torch.cat([x, context], dim=-1)
