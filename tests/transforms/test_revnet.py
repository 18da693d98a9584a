"""Reversible residual blocks and the memory-saving stack.

Independent answers: Jacobians by ``torch.func.jacrev`` (unit determinant), gradients of plain
autograd through the same blocks and finite differences (``gradcheck``), and the bytes autograd
stores, counted with ``saved_tensors_hooks`` and compared with an ordinary residual network.
"""

from __future__ import annotations

import pytest
import torch

from flowlab.errors import ConfigError, DataError
from flowlab.transforms.base import Inverse, randomize_
from flowlab.transforms.revnet import ResidualStack, RevBlock, RevNetStack

F64 = torch.float64


def _stack(dim: int = 5, depth: int = 4, hidden=(8, 7), activation: str = "tanh",
           seed: int = 0) -> RevNetStack:
    gen = torch.Generator().manual_seed(seed)
    return randomize_(RevNetStack(dim, depth, hidden, activation), std=0.4,
                      generator=gen).double()


def _plain(stack: RevNetStack, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The stack's map by ordinary autograd through its blocks (activations stored)."""
    for block in (reversed(stack.blocks) if inverse else stack.blocks):
        x = (block.inverse(x) if inverse else block(x))[0]
    return x


@pytest.mark.parametrize("dim", [2, 3, 4, 7])
def test_round_trips_and_unit_jacobian_determinant_both_ways(dim):
    stack = _stack(dim, depth=3)
    x = 2.0 * torch.randn(64, dim, dtype=F64)
    with torch.no_grad():
        y, ladj = stack(x)
        x_back, ladj_inv = stack.inverse(y)
        z = 2.0 * torch.randn(64, dim, dtype=F64)
        z_back = stack(stack.inverse(z)[0])[0]
    assert not torch.allclose(y, x, atol=0.05)  # far from the identity
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(z_back, z, atol=1e-10, rtol=1e-10)
    assert torch.equal(ladj, torch.zeros(64, dtype=F64)) and torch.equal(ladj, ladj_inv)
    for i in range(3):
        for fn, point in ((stack, x[i]), (stack.inverse, y[i])):
            jac = torch.func.jacrev(lambda v, fn=fn: fn(v[None])[0][0])(point)
            sign, logabs = torch.linalg.slogdet(jac)
            assert sign > 0 and abs(float(logabs)) < 1e-10
            assert not torch.allclose(jac, torch.eye(dim, dtype=F64), atol=0.05)


def test_block_splits_into_halves_as_documented():
    block = randomize_(RevBlock(5, (6,), "relu")).double()
    x = torch.randn(10, 5, dtype=F64)
    y, _ = block(x)
    y1 = x[:, :2] + block.f(x[:, 2:])
    torch.testing.assert_close(y, torch.cat([y1, x[:, 2:] + block.g(y1)], dim=1))


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dim, depth, activation", [(5, 6, "tanh"), (4, 3, "relu"),
                                                    (2, 1, "elu"), (8, 10, "silu")])
def test_memory_saving_gradients_equal_plain_autograd(dim, depth, activation, inverse):
    stack = _stack(dim, depth, activation=activation)
    x = torch.randn(9, dim, dtype=F64, requires_grad=True)
    weights = torch.randn(9, dim, dtype=F64)
    params = list(stack.parameters())

    out = stack.inverse(x)[0] if inverse else stack(x)[0]
    assert type(out.grad_fn).__name__ == "_ReversibleUpdatesBackward"
    reference = _plain(stack, x, inverse)
    assert torch.equal(out, reference)

    # through .backward(), twice: the parameters' .grad must accumulate like any other op's
    for _ in range(2):
        (out * weights).sum().backward(retain_graph=True)
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    expected = torch.autograd.grad((reference * weights).sum(), [x, *params])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, 2 * e, atol=1e-12, rtol=1e-10)
    assert all(float(e.abs().sum()) > 0 for e in expected)


def test_gradients_of_some_parameters_only_and_of_the_input_only():
    stack = _stack(4, 3)
    x = torch.randn(6, 4, dtype=F64)
    for p in stack.blocks[1].parameters():
        p.requires_grad_(False)
    trainable = [p for p in stack.parameters() if p.requires_grad]
    got = torch.autograd.grad(stack(x)[0].pow(2).sum(), trainable)
    expected = torch.autograd.grad(_plain(stack, x).pow(2).sum(), trainable)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
    stack.requires_grad_(False)
    xr = x.clone().requires_grad_()
    got_x = torch.autograd.grad(stack(xr)[0].pow(3).sum(), xr)[0]
    expected_x = torch.autograd.grad(_plain(stack, xr).pow(3).sum(), xr)[0]
    torch.testing.assert_close(got_x, expected_x, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_gradients_match_finite_differences(inverse):
    stack = _stack(4, depth=2, hidden=(3,))
    module = Inverse(stack) if inverse else stack
    names = [n for n, _ in module.named_parameters()]
    values = [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)),
                                          (x,))[0]

    assert torch.autograd.gradcheck(fn, (x, *values))


def test_not_twice_differentiable_says_so():
    stack = _stack(4, 2)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(stack(x)[0].pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()


def _saved_bytes(fn, parameters) -> tuple[int, int]:
    """Bytes of the tensors autograd saves while ``fn`` runs: (activations, parameters).

    Counted once per storage (autograd may save one tensor for several nodes); a tensor
    counts as a parameter if it shares storage with one (a transposed weight, say).
    """
    param_storages = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = (storage.nbytes(), storage.data_ptr() in param_storages)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    activations = sum(n for n, is_param in seen.values() if not is_param)
    params = sum(n for n, is_param in seen.values() if is_param)
    return activations, params


def test_reversible_stack_stores_the_same_bytes_at_any_depth():
    batch, dim, hidden = 256, 8, (64,)
    x = torch.randn(batch, dim)
    measured = {}
    for depth in (4, 16):
        torch.manual_seed(depth)
        rev = RevNetStack(dim, depth, hidden)
        plain = ResidualStack(dim, depth, hidden)
        measured[depth] = {
            "reversible": _saved_bytes(lambda rev=rev: rev(x), list(rev.parameters())),
            "same blocks, plain autograd": _saved_bytes(lambda rev=rev: _plain(rev, x),
                                                        list(rev.parameters())),
            "residual": _saved_bytes(lambda plain=plain: plain(x), list(plain.parameters())),
        }
        # the reversible stack saves its output and references to its parameters, nothing else
        n_params = sum(p.numel() for p in rev.parameters())
        assert measured[depth]["reversible"] == (batch * dim * 4, n_params * 4)
    print("\nbytes autograd stores (activations, parameters), batch 256, dim 8, hidden (64,):")
    for depth, row in measured.items():
        print(f"  depth {depth:2d}: " + "; ".join(f"{k} {v}" for k, v in row.items()))

    rev4, rev16 = measured[4]["reversible"][0], measured[16]["reversible"][0]
    res4, res16 = measured[4]["residual"][0], measured[16]["residual"][0]
    assert rev16 == rev4
    assert 3.5 < res16 / res4 < 4.5  # linear in depth
    assert res4 > 20 * rev4
    plain4, plain16 = (measured[d]["same blocks, plain autograd"][0] for d in (4, 16))
    assert 3.5 < plain16 / plain4 < 4.5


def test_no_graph_without_gradients_and_same_numbers():
    stack = _stack(6, 3)
    x = torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        y_nograd, _ = stack(x)
    y_grad, _ = stack(x)
    assert y_nograd.grad_fn is None and y_grad.grad_fn is not None
    assert torch.equal(y_nograd, y_grad)


def test_bad_options_and_inputs():
    for kwargs in ({"dim": 1}, {"dim": 2.0}, {"dim": True}, {"depth": 0}, {"depth": 1.5},
                   {"hidden": (0,)}, {"hidden": "64"}, {"hidden": (8.0,)}, {"hidden": 64},
                   {"activation": "gelu"}):
        options = {"dim": 4, "depth": 2, **kwargs}
        with pytest.raises(ConfigError):
            RevNetStack(**options)
    with pytest.raises(ConfigError):
        RevBlock(1)
    with pytest.raises(ConfigError):
        ResidualStack(4, 0)
    stack = RevNetStack(4, 2)
    with pytest.raises(DataError, match="shape"):
        stack(torch.randn(3, 5))
    with pytest.raises(DataError, match="shape"):
        stack.inverse(torch.randn(3, 2, 2))
    with pytest.raises(DataError, match="not conditional"):
        stack(torch.randn(3, 4), torch.randn(3, 2))
