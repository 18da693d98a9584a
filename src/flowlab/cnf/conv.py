"""Time-conditioned convolutional vector fields f(t, z) on images, for FFJORD.

The image analogue of :mod:`flowlab.cnf.nets`: each convolution sees time in one of three
ways (FFJORD, Grathwohl et al. 2019):

* ``concat``: time appended to the input as one more constant channel;
* ``concatsquash``: ``conv(z) * sigmoid(a t + c) + d t`` with one gate ``(a, c)`` and one
  shift ``d`` per output channel (FFJORD's default);
* ``ignore``: ``conv(z)`` (an autonomous field).

:class:`ConvVectorField` stacks such convolutions ``C -> hidden... -> C``. Shapes: ``z`` is
``(batch, C, H, W)``, ``t`` a scalar tensor or one time per sample ``(batch,)``; the output has
the shape of ``z``. The network never mixes samples (no batch statistics), so the divergence
of sample ``b`` depends on sample ``b`` alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowlab.cnf.nets import ACTIVATIONS, _time_column
from flowlab.errors import ConfigError, DataError


def _time_map(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(1, 1, 1, 1)`` (scalar) or ``(batch, 1, 1, 1)`` (one time per sample)."""
    return _time_column(t, z).reshape(-1, 1, 1, 1)


def _conv(
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int,
    padding: int,
    transpose: bool,
    extra_in: int = 0,
) -> nn.Module:
    """A (transposed) convolution from ``c_in + extra_in`` to ``c_out`` channels."""
    if min(c_in, c_out, kernel, stride) < 1 or padding < 0:
        raise ConfigError(
            f"convolution needs positive channels, kernel and stride and padding >= 0, got "
            f"c_in={c_in}, c_out={c_out}, kernel={kernel}, stride={stride}, padding={padding}"
        )
    cls = nn.ConvTranspose2d if transpose else nn.Conv2d
    return cls(c_in + extra_in, c_out, kernel, stride=stride, padding=padding)


class ConcatConv2d(nn.Module):
    """``conv([z, t])``: time as one extra input channel, constant over the image."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 3,
        stride: int = 1,
        padding: int = 1,
        transpose: bool = False,
    ):
        super().__init__()
        self.conv = _conv(c_in, c_out, kernel, stride, padding, transpose, extra_in=1)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = _time_map(t, z).expand(z.shape[0], 1, *z.shape[2:])
        return self.conv(torch.cat([z, tt], dim=1))


class ConcatSquashConv2d(nn.Module):
    """``conv(z) * sigmoid(a t + c) + d t``: time gates and shifts every output channel."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 3,
        stride: int = 1,
        padding: int = 1,
        transpose: bool = False,
    ):
        super().__init__()
        self.conv = _conv(c_in, c_out, kernel, stride, padding, transpose)
        self.gate = nn.Linear(1, c_out)
        self.shift = nn.Linear(1, c_out, bias=False)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = _time_column(t, z)
        gate = torch.sigmoid(self.gate(tt))[:, :, None, None]
        shift = self.shift(tt)[:, :, None, None]
        return self.conv(z) * gate + shift


class IgnoreConv2d(nn.Module):
    """``conv(z)``: ignores time (for autonomous dynamics)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 3,
        stride: int = 1,
        padding: int = 1,
        transpose: bool = False,
    ):
        super().__init__()
        self.conv = _conv(c_in, c_out, kernel, stride, padding, transpose)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z)


CONV_LAYERS = {"concat": ConcatConv2d, "concatsquash": ConcatSquashConv2d, "ignore": IgnoreConv2d}

# stride -> (kernel, stride, padding, transpose). Stride 1 keeps the side (3x3, padding 1);
# stride 2 maps a side n to floor(n / 2) and stride -2 (transposed) maps n to 2n, both with
# 4x4 kernels and padding 1, as in FFJORD's image networks.
_STRIDE_GEOMETRY = {1: (3, 1, 1, False), 2: (4, 2, 1, False), -2: (4, 2, 1, True)}


def _side_after(n: int, kernel: int, stride: int, padding: int, transpose: bool) -> int:
    if transpose:
        return (n - 1) * stride - 2 * padding + kernel
    return (n + 2 * padding - kernel) // stride + 1


class ConvVectorField(nn.Module):
    """A convolutional network f(t, z) on images with time fed to every layer.

    ``(batch, C, H, W) -> (batch, C, H, W)``: convolutions ``C -> hidden[0] -> ... -> C`` with
    an activation between them (none after the last).

    Args:
        shape: ``(C, H, W)`` of one image.
        hidden: channel counts of the hidden layers, e.g. ``(64, 64, 64)``.
        layer: how time enters each convolution: ``concat``, ``concatsquash`` or ``ignore``.
        activation: ``tanh``, ``softplus``, ``swish`` or ``elu``.
        strides: one per convolution (``len(hidden) + 1`` of them), each ``1`` (3x3, same
            size), ``2`` (4x4 with stride 2: halves the side, rounding down) or ``-2`` (4x4
            transposed with stride 2: doubles the side). ``None`` means all ``1``. An hourglass
            such as ``(1, 2, 1, -2, 1)`` needs even sides; sides that the strides do not bring
            back to ``(H, W)`` raise :class:`~flowlab.errors.ConfigError`.
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: Sequence[int] = (64, 64, 64),
        layer: str = "concatsquash",
        activation: str = "softplus",
        strides: Sequence[int] | None = None,
    ):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        hidden = tuple(int(h) for h in hidden)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(f"shape must be positive (C, H, W), got {shape}")
        if any(h < 1 for h in hidden):
            raise ConfigError(f"hidden channel counts must be positive, got {hidden}")
        if layer not in CONV_LAYERS:
            raise ConfigError(
                f"unknown layer type {layer!r}; choose one of {', '.join(CONV_LAYERS)}"
            )
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        strides = (1,) * (len(hidden) + 1) if strides is None else tuple(int(s) for s in strides)
        if len(strides) != len(hidden) + 1:
            raise ConfigError(
                f"need one stride per convolution ({len(hidden) + 1} for hidden={hidden}), "
                f"got {len(strides)}: {strides}"
            )
        if any(s not in _STRIDE_GEOMETRY for s in strides):
            raise ConfigError(f"strides must each be 1, 2 or -2, got {strides}")
        sides = list(shape[1:])
        for s in strides:
            sides = [_side_after(n, *_STRIDE_GEOMETRY[s]) for n in sides]
            if min(sides) < 1:
                raise ConfigError(
                    f"strides {strides} shrink the {shape[1]}x{shape[2]} image to nothing"
                )
        if tuple(sides) != shape[1:]:
            raise ConfigError(
                f"strides {strides} map sides {shape[1]}x{shape[2]} to {sides[0]}x{sides[1]}, "
                "not back to the input size (downsampling halves a side rounding down, so "
                "each downsampled side must be even)"
            )
        self.shape = shape
        self.strides = strides
        channels = [shape[0], *hidden, shape[0]]
        self.layers = nn.ModuleList(
            CONV_LAYERS[layer](a, b, *_STRIDE_GEOMETRY[s])
            for a, b, s in zip(channels[:-1], channels[1:], strides, strict=True)
        )
        self.activation = ACTIVATIONS[activation]()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or tuple(z.shape[1:]) != self.shape:
            raise DataError(
                f"expected images of shape (batch, {', '.join(map(str, self.shape))}), "
                f"got {tuple(z.shape)}"
            )
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
