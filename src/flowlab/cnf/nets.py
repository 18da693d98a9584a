"""Time-conditioned vector-field networks f(t, z) for continuous normalizing flows.

Three ways of feeding time to a linear layer (FFJORD, Grathwohl et al. 2019, appendix):

* ``concat``: ``W [z, t] + b``;
* ``concatsquash``: ``(W z + b) * sigmoid(a t + c) + d t`` (FFJORD's default);
* ``ignore``: ``W z + b`` (an autonomous field).

:class:`MLPVectorField` stacks such layers with a chosen activation; :class:`FourierVectorField`
feeds Fourier features of the state and of time to a plain MLP instead. Shapes: ``z`` is
``(batch, dim)``, ``t`` a scalar tensor or one time per row ``(batch,)`` (flow-matching
training evaluates every sample at its own time); the output has the shape of ``z``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from flowlab.errors import ConfigError


def _time_column(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t`` as a column: ``(1, 1)`` for a scalar time, ``(batch, 1)`` for one time per row."""
    t = torch.as_tensor(t).to(z)
    if t.ndim == 0 or t.numel() == 1:
        return t.reshape(1, 1)
    if t.shape != (z.shape[0],):
        raise ConfigError(
            f"time must be a scalar or one value per row {(z.shape[0],)}, got {tuple(t.shape)}"
        )
    return t.reshape(-1, 1)


class ConcatLinear(nn.Module):
    """``W [z, t] + b``: time appended to the input as one more feature."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = _time_column(t, z).expand(z.shape[0], 1)
        return self.linear(torch.cat([z, tt], dim=-1))


class ConcatSquashLinear(nn.Module):
    """``(W z + b) * sigmoid(a t + c) + d t``: time gates and shifts every output unit."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = _time_column(t, z)
        return self.linear(z) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


class IgnoreLinear(nn.Module):
    """``W z + b``: ignores time (for autonomous dynamics)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)


LAYERS = {"concat": ConcatLinear, "concatsquash": ConcatSquashLinear, "ignore": IgnoreLinear}

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "swish": nn.SiLU,
    "elu": nn.ELU,
}


class MLPVectorField(nn.Module):
    """A multilayer perceptron f(t, z) with time fed to every layer.

    Args:
        dim: dimension of z.
        hidden: widths of the hidden layers, e.g. ``(64, 64, 64)``.
        layer: how time enters each layer: ``concat``, ``concatsquash`` or ``ignore``.
        activation: ``tanh``, ``softplus``, ``swish`` or ``elu``.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (64, 64, 64),
        layer: str = "concatsquash",
        activation: str = "tanh",
    ):
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"unknown layer type {layer!r}; choose one of {', '.join(LAYERS)}")
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if dim < 1 or any(int(h) < 1 for h in hidden):
            raise ConfigError(f"dimensions must be positive, got dim={dim}, hidden={hidden}")
        widths = [dim, *[int(h) for h in hidden], dim]
        self.layers = nn.ModuleList(
            LAYERS[layer](a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h


class FourierVectorField(nn.Module):
    """An MLP on Fourier features of the state and of time: sharp densities, learned fast.

    The input of the network is ``[z, sin(B z), cos(B z), sin(k pi t), cos(k pi t)]`` with a
    fixed random matrix ``B`` (``dim x features``, entries N(0, scale^2), drawn from ``seed``
    and saved with the weights) and ``k = 1..time_frequencies``; a plain MLP follows. An MLP
    fed raw coordinates learns high spatial frequencies slowly (the spectral bias that Fourier
    features remove: Tancik et al. 2020), so the sharp edges of densities such as the
    checkerboard take many steps; with these features the same quality is reached in a
    fraction of the steps, and each step is cheaper than with concatsquash layers (time enters
    once, at the input). ``scale`` sets the spatial frequencies, in units of the data: about
    3 suits data of unit scale with features a quarter of that wide.

    Args:
        dim: dimension of z.
        hidden: widths of the hidden layers.
        activation: ``tanh``, ``softplus``, ``swish`` or ``elu``.
        features: number of random frequencies (each gives a sine and a cosine).
        scale: standard deviation of the frequencies.
        time_frequencies: number of time harmonics.
        seed: seed of ``B``.
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256, 256, 256),
        activation: str = "swish",
        features: int = 64,
        scale: float = 3.0,
        time_frequencies: int = 8,
        seed: int = 0,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        if dim < 1 or any(int(h) < 1 for h in hidden) or features < 1 or time_frequencies < 1:
            raise ConfigError(f"dimensions must be positive, got dim={dim}, hidden={hidden}, "
                              f"features={features}, time_frequencies={time_frequencies}")
        if not (scale > 0) or not math.isfinite(scale):
            raise ConfigError(f"the Fourier feature scale must be a positive number, got {scale}")
        generator = torch.Generator().manual_seed(int(seed))
        self.register_buffer("frequencies", torch.randn(dim, features, generator=generator)
                             * float(scale))
        self.register_buffer("harmonics", torch.arange(1, time_frequencies + 1) * math.pi)
        widths = [dim + 2 * features + 2 * time_frequencies, *[int(h) for h in hidden], dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = _time_column(t, z).expand(z.shape[0], 1) * self.harmonics.to(z)
        zz = z @ self.frequencies.to(z)
        h = torch.cat([z, zz.sin(), zz.cos(), tt.sin(), tt.cos()], dim=-1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
