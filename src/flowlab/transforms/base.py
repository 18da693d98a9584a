"""What every bijection in flowlab is, and the registry its conformance tests run over.

Direction, once for the whole package: ``forward`` maps the **data side x to the noise side
y** and returns ``(y, log|det dy/dx|)``; ``inverse`` maps y back to x and returns
``(x, log|det dx/dy|)``. Log-determinants have shape ``(batch,)``: one value per event.

A transform works on events of a declared shape (``(D,)`` for vectors, ``(C, H, W)`` for
images) and may change it (squeeze, factor-out): :meth:`Transform.output_shape` says how.
Conditional transforms take an optional ``context`` of shape ``(batch, context_dim)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flowlab.errors import ConfigError, DataError

Pair = tuple[torch.Tensor, torch.Tensor]


class Transform(nn.Module):
    """A bijection with its log-determinant (see the module docstring for the direction)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Event shape of ``forward``'s output for inputs of event shape ``shape``."""
        return tuple(shape)


class Inverse(Transform):
    """The inverse of a shape-preserving transform, as a transform (an IAF is the inverse of a
    MAF)."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        return self.transform.inverse(x, context)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        return self.transform.forward(y, context)


class Compose(Transform):
    """Transforms applied in order on ``forward`` (and in reverse order on ``inverse``)."""

    def __init__(self, transforms: Sequence[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        total = x.new_zeros(x.shape[0])
        for transform in self.transforms:
            x, ladj = transform(x, context)
            total = total + ladj
        return x, total

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        total = y.new_zeros(y.shape[0])
        for transform in reversed(self.transforms):
            y, ladj = transform.inverse(y, context)
            total = total + ladj
        return y, total

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        for transform in self.transforms:
            shape = transform.output_shape(shape)
        return tuple(shape)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)


def check_context(context: torch.Tensor | None, batch: int, context_dim: int | None,
                  ref: torch.Tensor) -> torch.Tensor | None:
    """Validate a context for a conditional transform (``context_dim`` None: unconditional)."""
    if context_dim is None:
        if context is not None:
            raise DataError("this transform is not conditional; pass no context (build it "
                            "with context_dim to condition on one)")
        return None
    if context is None:
        raise DataError(f"this transform is conditional: pass a context of shape "
                        f"(batch, {context_dim})")
    if not isinstance(context, torch.Tensor) or context.ndim != 2 \
            or context.shape[1] != context_dim:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context)
        raise DataError(f"context must have shape (batch, {context_dim}), got {got}")
    if context.shape[0] != batch:
        raise DataError(f"context has {context.shape[0]} rows for a batch of {batch}")
    if not torch.isfinite(context).all():
        raise DataError("context contains NaN or Inf values")
    return context.to(ref)


# -- registry of conformance examples ------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """A small instance of a transform that the conformance battery runs over.

    Attributes:
        build: makes the instance (float32, random parameters away from the identity).
        event_shape: the input event shape.
        context_dim: width of the context of a conditional transform (None: unconditional).
        scale: standard deviation of the test inputs (splines test their tails separately).
        train_eval_differ: True for batch norm, whose output depends on the mode.
    """

    build: Callable[[], Transform]
    event_shape: tuple[int, ...]
    context_dim: int | None = None
    scale: float = 1.0
    train_eval_differ: bool = False


EXAMPLES: dict[str, Example] = {}


def register_example(name: str, event_shape: Sequence[int], context_dim: int | None = None,
                     scale: float = 1.0, train_eval_differ: bool = False):
    """Decorator on a zero-argument factory: the transform joins the conformance battery."""

    def decorate(factory: Callable[[], Transform]) -> Callable[[], Transform]:
        if name in EXAMPLES:
            raise ConfigError(f"transform example {name!r} is registered twice")
        EXAMPLES[name] = Example(factory, tuple(event_shape), context_dim, scale,
                                 train_eval_differ)
        return factory

    return decorate


def randomize_(module: nn.Module, std: float = 0.3, generator: torch.Generator | None = None):
    """Give every parameter random values (examples start away from the identity, where a
    zero-initialized layer would hide errors in the log-determinant)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(std * torch.randn(param.shape, generator=generator))
    return module
