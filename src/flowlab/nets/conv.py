"""A small convolutional conditioner for coupling layers on images."""

from __future__ import annotations

from torch import nn

from flowlab.errors import ConfigError


class ConvNet(nn.Sequential):
    """``(B, c_in, H, W) -> (B, c_out, H, W)``: 3x3 conv, ReLU, 1x1 conv, ReLU, 3x3 conv.

    The last convolution starts at zero (the coupling starts as the identity), as in Glow.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int = 64, zero_last: bool = True):
        if min(c_in, c_out, hidden) < 1:
            raise ConfigError(f"channel counts must be positive, got {c_in}, {hidden}, {c_out}")
        last = nn.Conv2d(hidden, c_out, 3, padding=1)
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        super().__init__(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)
