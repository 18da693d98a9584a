"""MADE: a masked multilayer perceptron whose outputs are autoregressive in its inputs.

Germain et al. (2015), "MADE: Masked Autoencoder for Distribution Estimation". Every unit gets
a *degree*; a weight is kept only where it cannot carry information from an input to an output
that comes at or before it in the chosen order. One pass then gives, for every feature ``i``,
parameters that depend only on the features before ``i`` -- the conditioner of an
autoregressive transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from flowlab.errors import ConfigError, DataError
from flowlab.nets.mlp import ACTIVATIONS


def _positive_int(value, name: str) -> int:
    # bool is an int subclass; MADE(True, ...) is a mistake, not a width of 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_order(order: Sequence[int] | None, dim: int) -> list[int]:
    """``order`` as a list, checked to be a permutation of ``range(dim)`` (None: natural)."""
    if order is None:
        return list(range(dim))
    try:
        items = list(order)
    except TypeError:
        raise ConfigError(f"order must be a sequence of feature indices, got {order!r}") from None
    if any(isinstance(i, bool) or not isinstance(i, int) for i in items) \
            or sorted(items) != list(range(dim)):
        raise ConfigError(f"order must be a permutation of range({dim}), got {items}")
    return items


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask ``(out, in)``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Autoregressive parameters: ``(batch, dim) [+ context (batch, context_dim)] ->
    (batch, dim, params_per_dim)``.

    ``out[:, i, :]`` depends only on the inputs ``x[:, j]`` with ``j`` before ``i`` in
    ``order`` (so the first feature in the order gets parameters from the biases and the context
    alone). The context is not masked: it feeds every hidden unit and the output layer directly
    (without the direct path the first feature's parameters could not depend on the context).

    Hidden degrees: each hidden layer holds every degree ``1..dim-1`` equally often, and the
    ``width mod (dim-1)`` extra units get degrees drawn at random with ``seed`` (a narrow layer,
    ``width < dim - 1``, gets a random subset). A degree below the smallest of the layer before
    is raised to it so that no unit is cut off from its inputs.

    The output layer (and its context path) start at zero: a transform built on a MADE starts
    at the identity.
    """

    def __init__(self, dim: int, params_per_dim: int, hidden: Sequence[int] = (64, 64),
                 context_dim: int | None = None, order: Sequence[int] | None = None,
                 activation: str = "relu", seed: int = 0):
        super().__init__()
        self.dim = _positive_int(dim, "dim")
        self.params_per_dim = _positive_int(params_per_dim, "params_per_dim")
        try:
            widths = list(hidden)
        except TypeError:
            raise ConfigError(f"hidden must be a sequence of layer widths, got {hidden!r}") \
                from None
        widths = [_positive_int(w, "every hidden width") for w in widths]
        if context_dim is not None:
            context_dim = _positive_int(context_dim, "context_dim")
        self.context_dim = context_dim
        self.order = check_order(order, self.dim)
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}; choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")

        rank = torch.empty(self.dim, dtype=torch.long)
        rank[torch.tensor(self.order)] = torch.arange(self.dim)
        in_degrees = rank + 1  # 1..dim: position in the order
        generator = torch.Generator().manual_seed(seed)
        degrees = [in_degrees]
        for width in widths:
            degrees.append(self._hidden_degrees(width, int(degrees[-1].min()), generator))
        out_degrees = in_degrees.repeat_interleave(self.params_per_dim)

        # hidden unit of degree m sees inputs of degree <= m; an output of degree m sees only
        # hidden units (or inputs) of degree < m
        self.layers = nn.ModuleList(
            MaskedLinear((d_out[:, None] >= d_in[None, :]).float())
            for d_in, d_out in zip(degrees[:-1], degrees[1:], strict=True))
        self.out = MaskedLinear((out_degrees[:, None] > degrees[-1][None, :]).float())
        self.activation = ACTIVATIONS[activation]()
        if context_dim is None:
            self.context_layers = None
        else:
            self.context_layers = nn.ModuleList(
                nn.Linear(context_dim, w, bias=False) for w in [*widths, len(out_degrees)])
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if self.context_layers is not None:
            nn.init.zeros_(self.context_layers[-1].weight)

    def _hidden_degrees(self, width: int, floor: int, generator: torch.Generator) -> torch.Tensor:
        if self.dim == 1:
            # nothing can precede the only feature: hidden units see no input at all
            return torch.zeros(width, dtype=torch.long)
        top = self.dim - 1
        base = torch.arange(width // top * top) % top + 1
        extra = torch.randperm(top, generator=generator)[: width % top] + 1
        return torch.cat([base, extra.sort().values]).clamp(min=min(floor, top))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (batch, dim), ``context`` (batch, context_dim) or None ->
        ``(batch, dim, params_per_dim)``."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"MADE expects inputs of shape (batch, {self.dim}), "
                            f"got {tuple(x.shape)}")
        if (context is None) != (self.context_dim is None):
            raise DataError("MADE got a context it was not built for" if context is not None
                            else f"MADE needs a context of shape (batch, {self.context_dim})")
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if context is not None:
                h = h + self.context_layers[i](context)
            h = self.activation(h)
        out = self.out(h)
        if context is not None:
            out = out + self.context_layers[-1](context)
        return out.reshape(x.shape[0], self.dim, self.params_per_dim)
