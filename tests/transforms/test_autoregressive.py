"""MADE and the affine autoregressive transforms (MAF, IAF) against independent answers.

MADE's autoregressive property from its autograd Jacobian (strictly lower triangular in the
chosen order); MAF/IAF log-determinants against ``slogdet`` of the autograd Jacobian in float64,
in both directions; the number of sequential passes each direction takes.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowlab.errors import ConfigError, DataError
from flowlab.nets.made import MADE
from flowlab.transforms.autoregressive import MaskedAffineAutoregressive, iaf_step, maf_step
from flowlab.transforms.base import EXAMPLES, Inverse, randomize_

F64 = torch.float64


def batch_jacobian(fn, x):
    """Per-event Jacobians ``(batch, *out_event, *in_event)`` of a batched map, checking that
    events do not interact."""
    full = torch.func.jacrev(fn)(x)  # (batch, *out, batch, dim)
    idx = torch.arange(x.shape[0])
    inner = (slice(None),) * (full.ndim - 3)
    blocks = full[(idx, *inner, idx)]  # advanced indices first: (batch, *out, dim)
    off = full.clone()
    off[(idx, *inner, idx)] = 0
    assert off.abs().max() == 0, "events must not interact"
    return blocks


def made_jacobian_in_order(made, x, order, context=None):
    """``J[b, a, p, c]`` = d out[b, order[a], p] / d x[b, order[c]]."""
    jac = batch_jacobian(lambda z: made(z, context), x)  # (batch, dim, P, dim)
    o = torch.tensor(order)
    return jac[:, o][..., o]


ORDERS = {3: [[0, 1, 2], [2, 0, 1]], 5: [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 3, 0, 4, 2]]}


# -- MADE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,order", [(d, o) for d, orders in ORDERS.items() for o in orders])
@pytest.mark.parametrize("context_dim", [None, 2])
def test_made_jacobian_is_strictly_lower_triangular_in_order(dim, order, context_dim):
    made = randomize_(MADE(dim, 3, hidden=(32, 32), context_dim=context_dim, order=order,
                           activation="tanh"), std=0.5).to(F64)
    x = torch.randn(4, dim, dtype=F64)
    context = None if context_dim is None else torch.randn(4, context_dim, dtype=F64)
    jac = made_jacobian_in_order(made, x, order, context)
    upper = torch.triu(torch.ones(dim, dim, dtype=torch.bool))  # c >= a: must not depend
    assert jac.permute(0, 2, 1, 3)[..., upper].abs().max() == 0
    # and every allowed dependency is there (wide tanh layers connect every earlier feature)
    lower = jac.permute(0, 2, 1, 3)[..., ~upper]
    assert (lower.abs() > 1e-8).all()


def test_made_narrow_hidden_layers_keep_the_property():
    order = [3, 1, 5, 0, 2, 4]
    for seed in range(4):
        made = randomize_(MADE(6, 2, hidden=(3, 4, 2), order=order, seed=seed), std=0.5).to(F64)
        jac = made_jacobian_in_order(made, torch.randn(3, 6, dtype=F64), order)
        upper = torch.triu(torch.ones(6, 6, dtype=torch.bool))
        assert jac.permute(0, 2, 1, 3)[..., upper].abs().max() == 0


def test_made_without_hidden_layers_and_with_one_feature():
    made = randomize_(MADE(4, 2, hidden=(), order=[1, 0, 3, 2])).to(F64)
    jac = made_jacobian_in_order(made, torch.randn(2, 4, dtype=F64), [1, 0, 3, 2])
    assert jac.permute(0, 2, 1, 3)[..., torch.triu(torch.ones(4, 4, dtype=torch.bool))] \
        .abs().max() == 0
    single = randomize_(MADE(1, 3, context_dim=2)).to(F64)
    x = torch.randn(5, 1, dtype=F64)
    context = torch.randn(5, 2, dtype=F64)
    assert batch_jacobian(lambda z: single(z, context), x).abs().max() == 0
    out = single(x, context)
    assert out.shape == (5, 1, 3) and not torch.allclose(out, single(x, context + 1))


def test_made_shape_zero_start_and_seed():
    made = MADE(4, 3, hidden=(16, 16), context_dim=2)
    x, context = torch.randn(7, 4), torch.randn(7, 2)
    out = made(x, context)
    assert out.shape == (7, 4, 3)
    assert out.abs().max() == 0  # zero output layer: transforms start at the identity
    masks = [MADE(5, 2, hidden=(6,), seed=s).layers[0].mask for s in (0, 0, 1)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])  # 6 = 4 + 2 units: the 2 extra degrees vary


def test_made_context_changes_every_output():
    made = randomize_(MADE(3, 2, hidden=(16,), context_dim=2, order=[1, 2, 0]))
    x = torch.randn(5, 3)
    a = made(x, torch.zeros(5, 2))
    b = made(x, torch.ones(5, 2))
    # every feature, including the first in the order (fed by the context alone)
    assert ((a - b).abs().amax(dim=(0, 2)) > 1e-4).all()


@pytest.mark.parametrize("kwargs", [
    dict(dim=0, params_per_dim=2), dict(dim=3, params_per_dim=0),
    dict(dim=True, params_per_dim=2), dict(dim=3, params_per_dim=2, hidden=(16, 0)),
    dict(dim=3, params_per_dim=2, hidden=16), dict(dim=3, params_per_dim=2, context_dim=0),
    dict(dim=3, params_per_dim=2, order=[0, 1]), dict(dim=3, params_per_dim=2, order=[0, 1, 1]),
    dict(dim=3, params_per_dim=2, order=[0, 1, 3]), dict(dim=3, params_per_dim=2, order=3),
    dict(dim=3, params_per_dim=2, activation="sigmoid"),
    dict(dim=3, params_per_dim=2, seed=1.5),
])
def test_made_bad_options(kwargs):
    with pytest.raises(ConfigError):
        MADE(**kwargs)


def test_made_bad_inputs():
    made = MADE(3, 2, context_dim=2)
    with pytest.raises(DataError):
        made(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(DataError):
        made(torch.randn(4, 3))
    with pytest.raises(DataError):
        MADE(3, 2)(torch.randn(4, 3), torch.randn(4, 2))


# -- MAF / IAF ----------------------------------------------------------------------------------
def affine_layers():
    """(name, float64 transform, context) with random parameters and non-natural orders."""
    layers = [
        ("maf", maf_step(4, hidden=(16, 16), order=[2, 0, 3, 1]), None),
        ("maf-conditional", maf_step(4, hidden=(16,), context_dim=2), torch.randn(5, 2)),
        ("iaf", iaf_step(4, hidden=(16, 16), order=[3, 2, 1, 0]), None),
        ("iaf-conditional", iaf_step(4, hidden=(16,), context_dim=3, order=[1, 3, 0, 2]),
         torch.randn(5, 3)),
    ]
    out = []
    for i, (name, layer, context) in enumerate(layers):
        randomize_(layer, std=0.4, generator=torch.Generator().manual_seed(i))
        out.append((name, layer.to(F64), None if context is None else context.to(F64)))
    return out


@pytest.mark.parametrize("case", affine_layers(), ids=lambda c: c[0])
def test_affine_round_trip_and_logdet_against_autograd(case):
    _, layer, context = case
    x = 1.5 * torch.randn(5, 4, dtype=F64)
    y, ladj = layer(x, context)
    assert y.shape == x.shape and ladj.shape == (5,)
    assert (y - x).abs().max() > 0.1 and ladj.abs().max() > 0.1  # away from the identity
    back, ladj_inv = layer.inverse(y, context)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    jac = batch_jacobian(lambda z: layer(z, context)[0], x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-12)
    # the other direction on its own, at fresh noise-side points
    y2 = torch.randn(5, 4, dtype=F64)
    x2, ladj2 = layer.inverse(y2, context)
    jac_inv = batch_jacobian(lambda z: layer.inverse(z, context)[0], y2)
    torch.testing.assert_close(ladj2, torch.linalg.slogdet(jac_inv)[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x2, context)[0], y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-12)


def test_maf_forward_is_the_affine_map_and_triangular_in_order():
    order = [2, 0, 3, 1]
    layer = randomize_(maf_step(4, hidden=(16,), order=order)).to(F64)
    x = torch.randn(3, 4, dtype=F64)
    y, ladj = layer(x)
    jac = batch_jacobian(lambda z: layer(z)[0], x)
    o = torch.tensor(order)
    jac = jac[:, o][..., o]
    assert jac.triu(1).abs().max() == 0  # y_i reads x_i and features before it only
    diag = torch.diagonal(jac, dim1=1, dim2=2)
    assert (diag > 0).all()
    # y_i = x_i s_i + b_i: dy_i/dx_i = s_i, so ladj is the sum of log-diagonals
    torch.testing.assert_close(ladj, diag.log().sum(dim=1), rtol=0, atol=1e-12)
    # the first feature in the order depends on nothing: an affine map with constant mu, s
    first = order[0]
    x_shift = x.clone()
    x_shift[:, first] += 1.0
    slope = (layer(x_shift)[0][:, first] - y[:, first])
    torch.testing.assert_close(slope, diag[:, 0], rtol=0, atol=1e-12)


def count_made_calls(layer):
    made = layer.transform.made if isinstance(layer, Inverse) else layer.made
    calls = []
    handle = made.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_pass_counts_maf_density_iaf_sampling_in_one_pass():
    dim = 5
    maf, iaf = maf_step(dim, hidden=(8,)), iaf_step(dim, hidden=(8,))
    x = torch.randn(2, dim)
    for layer, forward_passes, inverse_passes in ((maf, 1, dim), (iaf, dim, 1)):
        calls, handle = count_made_calls(layer)
        layer(x)
        assert len(calls) == forward_passes
        calls.clear()
        layer.inverse(x)
        assert len(calls) == inverse_passes
        handle.remove()


def test_iaf_is_the_maf_turned_around():
    maf = randomize_(maf_step(3, hidden=(8,), order=[1, 2, 0])).to(F64)
    iaf = Inverse(maf)
    x = torch.randn(4, 3, dtype=F64)
    for a, b in zip(iaf(x), maf.inverse(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert isinstance(iaf_step(3), Inverse)
    assert isinstance(iaf_step(3).transform, MaskedAffineAutoregressive)


def test_fresh_layers_start_at_the_identity():
    x = torch.randn(6, 3)
    for layer, context in ((maf_step(3), None), (iaf_step(3, context_dim=2), torch.randn(6, 2))):
        for direction in (layer.forward, layer.inverse):
            y, ladj = direction(x, context)
            assert torch.equal(y, x) and torch.equal(ladj, torch.zeros(6))


def test_scale_is_floored_below_and_grows_slowly_above():
    """s = softplus(r + r0) + e^-c: raw outputs far beyond sane values give the floor e^-c
    (log-scale -c) below and a scale linear in r above, and both stay invertible."""
    layer = maf_step(2, hidden=(4,))
    c = layer.log_scale_bound
    x = torch.randn(3, 2)
    r0 = math.log(math.expm1(1 - math.exp(-c)))
    for raw, log_scale in ((-1e4, -c), (1e4, math.log(1e4 + r0 + math.exp(-c)))):
        with torch.no_grad():
            layer.made.out.bias[1::2] = raw  # raw scales (not shifts)
        y, ladj = layer(x)
        back, ladj_back = layer.inverse(y)
        assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
        torch.testing.assert_close(ladj, torch.full((3,), 2 * log_scale))
        torch.testing.assert_close(y, x * math.exp(log_scale))  # the shifts are zero
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ladj_back, -ladj)


def test_gradients_reach_every_parameter_in_float32():
    layer = randomize_(maf_step(3, hidden=(8,), context_dim=2))
    x, context = torch.randn(4, 3), torch.randn(4, 2)
    y, ladj = layer(x, context)
    assert y.dtype == torch.float32
    (y.square().sum() - ladj.sum()).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("make", [maf_step, iaf_step])
def test_context_changes_outputs(make):
    layer = randomize_(make(3, hidden=(16,), context_dim=2)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    a, la = layer(x, torch.zeros(5, 2, dtype=F64))
    b, lb = layer(x, torch.ones(5, 2, dtype=F64))
    assert (a - b).abs().amax(dim=0).min() > 1e-4 and (la - lb).abs().min() > 1e-6
    a, _ = layer.inverse(x, torch.zeros(5, 2, dtype=F64))
    b, _ = layer.inverse(x, torch.ones(5, 2, dtype=F64))
    assert (a - b).abs().amax(dim=0).min() > 1e-4


@pytest.mark.parametrize("kwargs", [
    dict(dim=0), dict(dim=3, hidden=(0,)), dict(dim=3, context_dim=-1),
    dict(dim=3, order=[0, 0, 1]), dict(dim=3, log_scale_bound=0.0),
    dict(dim=3, log_scale_bound=float("inf")),
])
def test_bad_options(kwargs):
    with pytest.raises(ConfigError):
        MaskedAffineAutoregressive(**kwargs)


@pytest.mark.parametrize("make", [maf_step, iaf_step])
def test_bad_inputs_and_contexts(make):
    conditional, plain = make(3, context_dim=2), make(3)
    x = torch.randn(4, 3)
    for direction in ("forward", "inverse"):
        call = getattr(conditional, direction)
        for context in (None, torch.randn(4, 3), torch.randn(5, 2), torch.randn(4, 2, 1),
                        torch.full((4, 2), float("nan"))):
            with pytest.raises(DataError):
                call(x, context)
        with pytest.raises(DataError):
            getattr(plain, direction)(x, torch.randn(4, 2))
        for bad in (torch.randn(4, 2), torch.randn(4, 3, 1), torch.ones(4, 3, dtype=torch.long)):
            with pytest.raises(DataError):
                getattr(plain, direction)(bad)


def test_examples_are_registered_away_from_the_identity():
    for name, shape, context_dim in (("maf-affine", (3,), None),
                                     ("maf-affine-conditional", (3,), 2),
                                     ("iaf-affine", (3,), None)):
        example = EXAMPLES[name]
        assert example.event_shape == shape and example.context_dim == context_dim
        layer = example.build()
        x = torch.randn(8, *shape)
        context = None if context_dim is None else torch.randn(8, context_dim)
        y, ladj = layer(x, context)
        assert (y - x).abs().max() > 0.05 and ladj.abs().max() > 0.05
