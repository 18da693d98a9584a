"""Shape-changing bijections of multiscale flows: squeeze and factor-out (split).

Both have log|det J| = 0 and only move numbers around; they make the event shape change
along the flow, which :meth:`Transform.output_shape` reports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowlab.errors import ConfigError, DataError
from flowlab.transforms.base import Pair, Transform, randomize_, register_example


class Squeeze(Transform):
    """``(C, H, W) -> (4C, H/2, W/2)``: each 2x2 patch of pixels becomes 4 channels."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise DataError(f"squeeze needs (batch, C, H, W) with even H and W, got "
                            f"{tuple(x.shape)}")
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        b, c4, h2, w2 = y.shape
        x = y.reshape(b, c4 // 4, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c4 // 4, 2 * h2, 2 * w2), y.new_zeros(b)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ConfigError(f"squeeze needs even height and width, got {shape}")
        return (4 * c, h // 2, w // 2)


class Split(Transform):
    """Factor-out (RealNVP, Glow): the first ``factor`` channels leave the flow here (they go
    straight to the base distribution); the rest go through ``inner``, which may change shape.

    ``forward`` returns a flat ``(batch, N)`` vector: the factored-out channels, then
    ``inner``'s output, flattened. ``inverse`` takes that vector apart again.
    """

    def __init__(self, event_shape: Sequence[int], inner: Transform, factor: int | None = None):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)
        c = self.event_shape[0]
        self.factor = c // 2 if factor is None else int(factor)
        if not 0 < self.factor < c:
            raise ConfigError(f"factor out between 1 and {c - 1} of {c} channels, got "
                              f"{self.factor}")
        self.inner = inner
        self.rest_shape = (c - self.factor, *self.event_shape[1:])
        self.inner_shape = tuple(inner.output_shape(self.rest_shape))
        self.out_numel = self.factor * int(torch.Size(self.event_shape[1:]).numel()) + int(
            torch.Size(self.inner_shape).numel())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        out, rest = x[:, :self.factor], x[:, self.factor:]
        rest, ladj = self.inner(rest, context)
        return torch.cat([out.flatten(1), rest.flatten(1)], dim=1), ladj

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        n_out = self.factor * int(torch.Size(self.event_shape[1:]).numel())
        out = y[:, :n_out].reshape(y.shape[0], self.factor, *self.event_shape[1:])
        rest = y[:, n_out:].reshape(y.shape[0], *self.inner_shape)
        rest, ladj = self.inner.inverse(rest, context)
        return torch.cat([out, rest], dim=1), ladj

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (self.out_numel,)


@register_example("squeeze", event_shape=(2, 4, 2))
def _squeeze_example() -> Transform:
    return Squeeze()


@register_example("split", event_shape=(4, 2, 2))
def _split_example() -> Transform:
    from flowlab.transforms.coupling import AffineCoupling

    inner = randomize_(AffineCoupling((2, 2, 2), "channel", hidden=8), std=0.1)
    return Split((4, 2, 2), inner)
