"""Reversible residual networks (Gomez et al., "The Reversible Residual Network: Backpropagation
Without Storing Activations", 2017), as volume-preserving transforms.

A block splits ``x`` of shape ``(batch, dim)`` into halves ``x1`` (the first ``dim // 2``
features) and ``x2`` (the rest) and applies two additive updates:
``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` (``forward``, data -> noise). Each update only adds a
function of the other half, so the block is inverted exactly by undoing them in reverse order
(``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``), and its Jacobian is triangular with unit diagonal
blocks: ``log|det| = 0``.

Because every block's input can be recomputed from its output, :class:`RevNetStack` need not
keep the activations of a forward pass for backpropagation: its backward pass walks the blocks
from the last one, rebuilding each input by inversion and recomputing ``F`` and ``G`` there.
Autograd then stores one tensor (the stack's output) whatever the depth. :class:`ResidualStack`
is an ordinary residual network of the same shape, storing everything, for comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from flowlab.errors import ConfigError, DataError
from flowlab.nets.mlp import ACTIVATIONS, MLP
from flowlab.transforms.base import Pair, Transform, check_context, randomize_, register_example


def _check_options(name: str, dim: int, hidden: Sequence[int], activation: str,
                   depth: int | None = None, min_dim: int = 2) -> tuple[int, ...]:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < min_dim:
        raise ConfigError(f"{name}: dim must be an integer of at least {min_dim}, got {dim!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)
                              or depth < 1):
        raise ConfigError(f"{name}: depth must be a positive integer, got {depth!r}")
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) \
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                       for h in hidden):
        raise ConfigError(f"{name}: hidden must be a sequence of positive integers, got "
                          f"{hidden!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{name}: unknown activation {activation!r}; choose one of "
                          f"{', '.join(ACTIVATIONS)}")
    return tuple(hidden)


def _check_vectors(name: str, x: torch.Tensor, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"{name} works on vectors of shape (batch, {dim}), got {got}")


@dataclass(frozen=True)
class _Update:
    """One additive update ``halves[target] += sign * net(halves[source])``."""

    net: nn.Module
    source: int
    target: int
    sign: float


def _run(updates: Sequence[_Update], x: torch.Tensor, split: int) -> torch.Tensor:
    halves = [x[:, :split], x[:, split:]]
    for up in updates:
        halves[up.target] = halves[up.target] + up.sign * up.net(halves[up.source])
    return torch.cat(halves, dim=1)


class RevBlock(Transform):
    """One reversible block on ``(batch, dim)``: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``
    (``forward``, data -> noise), ``log|det| = 0`` both ways.

    ``F`` maps ``dim - dim // 2`` features to ``dim // 2`` and ``G`` the other way; both are
    :class:`~flowlab.nets.MLP` with hidden widths ``hidden``, their last layer starting at zero
    (the block starts as the identity).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64,), activation: str = "relu"):
        super().__init__()
        hidden = _check_options("RevBlock", dim, hidden, activation)
        self.dim = dim
        self.split = dim // 2
        self.f = MLP(dim - self.split, self.split, hidden, activation)
        self.g = MLP(self.split, dim - self.split, hidden, activation)

    def updates(self, inverse: bool = False) -> list[_Update]:
        """The additive updates this block applies, in order, for ``forward`` (or
        ``inverse``)."""
        if inverse:
            return [_Update(self.g, 0, 1, -1.0), _Update(self.f, 1, 0, -1.0)]
        return [_Update(self.f, 1, 0, 1.0), _Update(self.g, 0, 1, 1.0)]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` ``(batch, dim)`` -> noise ``y``, with ``log|det dy/dx| = 0``
        ``(batch,)``."""
        _check_vectors("RevBlock", x, self.dim)
        check_context(context, x.shape[0], None, x)
        return _run(self.updates(), x, self.split), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` ``(batch, dim)`` -> data ``x``, with ``log|det dx/dy| = 0``
        ``(batch,)``."""
        _check_vectors("RevBlock", y, self.dim)
        check_context(context, y.shape[0], None, y)
        return _run(self.updates(inverse=True), y, self.split), y.new_zeros(y.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


@dataclass(frozen=True)
class _Plan:
    """What the memory-saving autograd function runs: additive updates in order, where the
    halves split, and for each update the names of its net's parameters and their positions
    in the flat parameter list passed to the function."""

    updates: tuple[_Update, ...]
    split: int
    param_names: tuple[tuple[str, ...], ...]
    param_slices: tuple[tuple[int, int], ...]


class _ReversibleUpdates(torch.autograd.Function):
    """``y = updates(x)`` with a backward pass that recomputes instead of storing.

    Saved for backward: the output and references to the parameters (which exist anyway), no
    input and no activation. Backward undoes the updates from the last: for
    ``h[t] <- h[t] + s * net(h[src])`` it evaluates ``net(h[src])`` once, which both restores
    ``h[t]`` (by subtraction) and gives the vector-Jacobian products for the source half and
    the net's parameters; the target half's gradient passes through unchanged. Parameter
    gradients come back as this function's input gradients, so that autograd accumulates them
    into ``.grad`` as for any other operation.

    The recomputation uses ``torch.func.vjp`` on the net with its parameters as explicit
    arguments (``functional_call``) rather than ``requires_grad_`` + ``torch.autograd.grad``:
    the same vector-Jacobian products, but it also runs when this backward is itself executed
    under a ``torch.func`` transform (``jacrev`` vmaps it), where those two are unsupported.
    """

    @staticmethod
    def forward(x: torch.Tensor, plan: _Plan, *params: torch.Tensor) -> torch.Tensor:
        return _run(plan.updates, x, plan.split)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.plan = inputs[1]
        # the parameters are saved (not just read off the modules again in backward) so that
        # backward uses exactly the tensors forward used, with autograd's check that they
        # were not modified in place in between; they are references, not copies
        ctx.save_for_backward(output, *inputs[2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        y, *values = ctx.saved_tensors
        plan: _Plan = ctx.plan
        needed = ctx.needs_input_grad[2:]
        h = [y[:, :plan.split], y[:, plan.split:]]
        grads = [grad_y[:, :plan.split], grad_y[:, plan.split:]]
        param_grads: list[torch.Tensor | None] = [None] * len(values)
        for up, names, (start, stop) in zip(reversed(plan.updates), reversed(plan.param_names),
                                            reversed(plan.param_slices), strict=True):
            wanted = [i for i in range(start, stop) if needed[i]]
            fixed = {names[i - start]: values[i].detach() for i in range(start, stop)
                     if not needed[i]}
            free_names = tuple(names[i - start] for i in wanted)

            def call(source, *free, net=up.net, free_names=free_names, fixed=fixed):
                return torch.func.functional_call(
                    net, {**fixed, **dict(zip(free_names, free, strict=True))}, (source,))

            out, pullback = torch.func.vjp(call, h[up.source].detach(),
                                           *(values[i].detach() for i in wanted))
            found = pullback(up.sign * grads[up.target])
            h[up.target] = h[up.target] - up.sign * out
            grads[up.source] = grads[up.source] + found[0]
            for i, g in zip(wanted, found[1:], strict=True):
                param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
        grad_x = torch.cat(grads, dim=1) if ctx.needs_input_grad[0] else None
        return (grad_x, None, *param_grads)


class RevNetStack(Transform):
    """``depth`` reversible blocks on ``(batch, dim)`` (``forward``: data -> noise),
    ``log|det| = 0`` both ways.

    When gradients are needed, ``forward`` and ``inverse`` run as one autograd function that
    stores only their output and recomputes each block's input by inversion in the backward
    pass: the memory autograd holds does not grow with ``depth``. Gradients are those of
    ordinary backpropagation through :attr:`blocks` up to rounding in the reconstruction (the
    reconstructed inputs differ from the true ones by a few ulps per block). Not
    twice-differentiable.

    Args:
        dim: the event size D (at least 2: the blocks split it into halves).
        depth: the number of blocks.
        hidden: hidden widths of each block's ``F`` and ``G``.
        activation: one of :data:`flowlab.nets.ACTIVATIONS`.
    """

    def __init__(self, dim: int, depth: int, hidden: Sequence[int] = (64,),
                 activation: str = "relu"):
        super().__init__()
        hidden = _check_options("RevNetStack", dim, hidden, activation, depth)
        self.dim = dim
        self.depth = depth
        self.blocks = nn.ModuleList(RevBlock(dim, hidden, activation) for _ in range(depth))

    def _plan(self, inverse: bool) -> tuple[_Plan, list[torch.Tensor]]:
        blocks = reversed(self.blocks) if inverse else self.blocks
        updates = [up for block in blocks for up in block.updates(inverse)]
        params: list[torch.Tensor] = []
        names, slices = [], []
        for up in updates:
            start = len(params)
            named = list(up.net.named_parameters())
            params.extend(p for _, p in named)
            names.append(tuple(n for n, _ in named))
            slices.append((start, len(params)))
        return _Plan(tuple(updates), self.dim // 2, tuple(names), tuple(slices)), params

    def _run_stack(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        plan, params = self._plan(inverse)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _ReversibleUpdates.apply(x, plan, *params)
        return _run(plan.updates, x, plan.split)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Data ``x`` ``(batch, dim)`` -> noise ``y``, with ``log|det dy/dx| = 0``
        ``(batch,)``."""
        _check_vectors("RevNetStack", x, self.dim)
        check_context(context, x.shape[0], None, x)
        return self._run_stack(x, inverse=False), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> Pair:
        """Noise ``y`` ``(batch, dim)`` -> data ``x``, with ``log|det dx/dy| = 0``
        ``(batch,)``."""
        _check_vectors("RevNetStack", y, self.dim)
        check_context(context, y.shape[0], None, y)
        return self._run_stack(y, inverse=True), y.new_zeros(y.shape[0])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, depth={self.depth}"


class ResidualStack(nn.Module):
    """An ordinary residual network ``x <- x + MLP_k(x)``, ``k = 1..depth``, on
    ``(batch, dim)`` -> ``(batch, dim)``: the baseline whose backward pass needs every block's
    stored activations. Not a transform (not invertible in general).
    """

    def __init__(self, dim: int, depth: int, hidden: Sequence[int] = (64,),
                 activation: str = "relu"):
        super().__init__()
        hidden = _check_options("ResidualStack", dim, hidden, activation, depth, min_dim=1)
        self.dim = dim
        self.nets = nn.ModuleList(MLP(dim, dim, hidden, activation, zero_last=False)
                                  for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_vectors("ResidualStack", x, self.dim)
        for net in self.nets:
            x = x + net(x)
        return x


@register_example("revnet", (4,))
def _revnet_example() -> Transform:
    gen = torch.Generator().manual_seed(15)
    return randomize_(RevNetStack(4, depth=3, hidden=(16,), activation="tanh"), std=0.3,
                      generator=gen)
