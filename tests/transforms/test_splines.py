"""Rational-quadratic splines and the spline transforms against independent answers.

The knots from a numpy re-derivation of the documented parameterisation; values and
derivatives at the knots; log-derivatives against central finite differences in float64; a
scalar re-implementation of the bin formula of Durkan et al. (2019); transform log-determinants
against ``slogdet`` of the autograd Jacobian in both directions. Then the numerics: tails,
exact edges, huge inputs (values and gradients), float32 round trips, monotonicity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowlab.errors import ConfigError, DataError
from flowlab.transforms.base import EXAMPLES, randomize_
from flowlab.transforms.splines import (
    RQSAutoregressive,
    RQSCoupling,
    rational_quadratic_spline,
    spline_knots,
)

F64 = torch.float64
MIN = 1e-3  # the default min_width, min_height, min_derivative


def raw_params(shape, bins, scale=1.5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(*shape, k, generator=g, dtype=dtype)
                 for k in (bins, bins, bins - 1))


def reference_knots(widths, heights, derivatives, bound):
    """The documented parameterisation, re-derived in numpy float64."""
    def knots(raw):
        raw = raw.detach().numpy().astype(np.float64)
        soft = np.exp(raw - raw.max(-1, keepdims=True))
        soft /= soft.sum(-1, keepdims=True)
        fractions = MIN + (1 - MIN * raw.shape[-1]) * soft
        zero = np.zeros((*raw.shape[:-1], 1))
        return -bound + 2 * bound * np.concatenate([zero, np.cumsum(fractions, -1)], -1)

    raw_d = derivatives.detach().numpy().astype(np.float64)
    # softplus(raw + c) with softplus(c) = 1 - MIN
    c = np.log(np.expm1(1 - MIN))
    inner = MIN + np.logaddexp(0, raw_d + c)
    ones = np.ones((*raw_d.shape[:-1], 1))
    return knots(widths), knots(heights), np.concatenate([ones, inner, ones], -1)


def spline(x, params, inverse=False, bound=2.0):
    return rational_quadratic_spline(x, *params, inverse=inverse, bound=bound)


def expand_params(params, n):
    """Parameters ``(rows, k)`` repeated for ``n`` inputs per row: ``(rows, n, k)``."""
    return tuple(p.unsqueeze(1).expand(p.shape[0], n, p.shape[-1]) for p in params)


# -- the elementwise spline ---------------------------------------------------------------------
@pytest.mark.parametrize("bins", [1, 2, 5, 12])
def test_values_and_derivatives_at_the_knots(bins):
    bound = 2.0
    params = raw_params((6,), bins)
    xk, yk, dk = reference_knots(*params, bound)
    torch.testing.assert_close(spline_knots(*params, bound=bound)[0], torch.from_numpy(xk))
    at = expand_params(params, bins + 1)
    y, ladj = spline(torch.from_numpy(xk), at, bound=bound)
    np.testing.assert_allclose(y.numpy(), yk, rtol=0, atol=1e-12)
    # the numpy knots differ from torch's in the last bits, and a narrow bin turns that into
    # a relative position of about 1e-13 inside it
    np.testing.assert_allclose(ladj.numpy(), np.log(dk), rtol=0, atol=1e-10)
    x, ladj_inv = spline(torch.from_numpy(yk), at, inverse=True, bound=bound)
    np.testing.assert_allclose(x.numpy(), xk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ladj_inv.numpy(), -np.log(dk), rtol=0, atol=1e-10)
    # one-sided second-order differences from each side of each knot: both equal the given
    # derivative, so the spline is C1 there (at the ends: slope 1, joining the identity tails)
    h = 1e-7

    def f(z):
        return spline(torch.from_numpy(z), at, bound=bound)[0].numpy()

    right = (-3 * f(xk) + 4 * f(xk + h) - f(xk + 2 * h)) / (2 * h)
    left = (3 * f(xk) - 4 * f(xk - h) + f(xk - 2 * h)) / (2 * h)
    np.testing.assert_allclose(right, dk, rtol=1e-6, atol=0)
    np.testing.assert_allclose(left, dk, rtol=1e-6, atol=0)


def test_log_derivative_against_central_differences():
    bound, n = 2.0, 200
    params = expand_params(raw_params((4,), 7, scale=2.0), n)
    x = torch.empty(4, n, dtype=F64).uniform_(-bound + 1e-4, bound - 1e-4)
    h = 1e-6
    for inverse in (False, True):
        out, ladj = spline(x, params, inverse, bound)
        fd = (spline(x + h, params, inverse, bound)[0]
              - spline(x - h, params, inverse, bound)[0]) / (2 * h)
        # a knot inside [x - h, x + h] only costs O(h) (the derivative is continuous)
        torch.testing.assert_close(ladj, fd.log(), rtol=0, atol=1e-5)
        torch.testing.assert_close(ladj, autograd_log_derivative(x, params, inverse, bound),
                                   rtol=0, atol=1e-10)


def autograd_log_derivative(x, params, inverse, bound):
    z = x.clone().requires_grad_(True)
    out, _ = spline(z, params, inverse, bound)
    (grad,) = torch.autograd.grad(out.sum(), z)
    return grad.log()


def reference_bin_value(x, xk, yk, dk):
    """Durkan et al. (2019), eq. 4, for one scalar, in plain Python."""
    k = max(i for i in range(len(xk) - 1) if xk[i] <= x)
    k = min(k, len(xk) - 2)
    w, h = xk[k + 1] - xk[k], yk[k + 1] - yk[k]
    s, xi = h / w, (x - xk[k]) / w
    numerator = h * (s * xi ** 2 + dk[k] * xi * (1 - xi))
    return yk[k] + numerator / (s + (dk[k + 1] + dk[k] - 2 * s) * xi * (1 - xi))


def test_values_against_a_scalar_reference():
    bound = 3.0
    params = raw_params((3,), 6, scale=1.0, seed=3)
    xk, yk, dk = reference_knots(*params, bound)
    x = torch.linspace(-bound, bound, 37, dtype=F64)
    y, _ = spline(x.expand(3, 37), expand_params(params, 37), bound=bound)
    for row in range(3):
        expected = [reference_bin_value(v, xk[row], yk[row], dk[row]) for v in x.tolist()]
        np.testing.assert_allclose(y[row].numpy(), expected, rtol=0, atol=1e-12)


def test_zero_parameters_and_one_bin_are_the_identity():
    x = torch.linspace(-4, 4, 101, dtype=F64)
    for params in (tuple(torch.zeros(101, k, dtype=F64) for k in (5, 5, 4)),
                   raw_params((101,), 1)):  # one bin: end slopes 1 and slope 1
        y, ladj = spline(x, params, bound=3.0)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(ladj, torch.zeros_like(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tails_are_the_identity_with_zero_log_derivative(dtype):
    bound = 2.0
    x = torch.tensor([-1e30, -1e6, -50.0, -2.001, 2.001, 7.0, 1e6, 1e30], dtype=dtype)
    params = raw_params((8,), 5, dtype=dtype)
    for inverse in (False, True):
        y, ladj = spline(x, params, inverse, bound)
        assert torch.equal(y, x) and torch.equal(ladj, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("inverse", [False, True])
def test_huge_inputs_and_edges_give_finite_values_and_gradients(dtype, inverse):
    bound = 2.0
    x = torch.tensor([1e6, -1e30, bound, -bound, 0.3, 1e30, -1e6], dtype=dtype,
                     requires_grad=True)
    params = tuple(p.requires_grad_(True) for p in raw_params((7,), 5, dtype=dtype))
    y, ladj = spline(x, params, inverse, bound)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    grads = torch.autograd.grad(y.sum() + ladj.sum(), (x, *params))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][[0, 1, 5, 6]], torch.ones(4, dtype=dtype))  # identity tails
    for g in grads[1:]:
        assert g[[0, 1, 5, 6]].abs().max() == 0  # tails do not depend on the parameters
        assert g[[2, 3, 4]].abs().max() > 0


def test_edges_and_interior_knots_are_exact_and_round_trip_in_float32():
    bound, bins = 2.0, 6
    params = raw_params((5,), bins, scale=1.0, dtype=torch.float32)
    xk, yk, _ = spline_knots(*params, bound=bound)
    assert (xk[:, 0] == -bound).all() and (xk[:, -1] == bound).all()
    assert (yk[:, 0] == -bound).all() and (yk[:, -1] == bound).all()
    at = expand_params(params, bins + 1)
    y, ladj = spline(xk, at, bound=bound)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    torch.testing.assert_close(y, yk, rtol=0, atol=1e-6)
    assert (y[:, 0] == -bound).all()
    back, ladj_inv = spline(y, at, inverse=True, bound=bound)
    assert torch.isfinite(back).all() and torch.isfinite(ladj_inv).all()
    torch.testing.assert_close(back, xk, rtol=0, atol=1e-5)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-5)
    # and from the noise side: the knots of y go back to the knots of x
    x_from_y, _ = spline(yk, at, inverse=True, bound=bound)
    torch.testing.assert_close(x_from_y, xk, rtol=0, atol=1e-6)


def test_round_trip_in_float32_over_the_whole_interval():
    bound, n = 2.0, 4001
    params = expand_params(raw_params((16,), 8, scale=0.75, dtype=torch.float32, seed=5), n)
    x = torch.linspace(-bound - 0.5, bound + 0.5, n).expand(16, n)
    y, ladj = spline(x, params, bound=bound)
    back, ladj_inv = spline(y, params, inverse=True, bound=bound)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(x), rtol=0, atol=1e-4)
    y2, _ = spline(spline(x, params, inverse=True, bound=bound)[0], params, bound=bound)
    torch.testing.assert_close(y2, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_round_trip_of_steep_splines_is_limited_by_conditioning_only(dtype):
    """Where the slope f' is tiny, rounding y already moves x by about eps |y| / f': no inverse
    can do better. A root formula that cancels (2c / (-b - sqrt) when the right end of a bin
    is steep) loses a further factor of up to max derivative / bin slope on top of that."""
    bound, n = 2.0, 4001
    params = expand_params(raw_params((16,), 8, scale=2.0, dtype=dtype, seed=5), n)
    x = torch.linspace(-bound, bound, n, dtype=dtype).expand(16, n)
    y, ladj = spline(x, params, bound=bound)
    assert ladj.exp().min() < 1e-3  # the test needs flat regions
    back, _ = spline(y, params, inverse=True, bound=bound)
    eps = torch.finfo(dtype).eps
    assert torch.isfinite(back).all()
    assert ((back - x).abs() <= 16 * eps * (1 + bound / ladj.exp())).all()


def test_monotone_and_onto_the_interval():
    bound, n = 2.0, 20001
    params = expand_params(raw_params((8,), 10, scale=3.0, seed=7), n)
    x = torch.linspace(-1.5 * bound, 1.5 * bound, n, dtype=F64).expand(8, n)
    for inverse in (False, True):
        y, _ = spline(x, params, inverse, bound)
        assert (y.diff(dim=1) > 0).all()
        inside = x.abs() <= bound
        assert (y[inside].abs() <= bound).all()


def test_broadcasting_and_dtype():
    params = raw_params((1,), 4, dtype=torch.float32)
    x = torch.randn(3, 5)
    y, ladj = spline(x, tuple(p.reshape(1, 1, -1) for p in params))
    assert y.shape == ladj.shape == (3, 5) and y.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [
    dict(bound=0.0), dict(bound=-1.0), dict(bound=float("inf")), dict(bound=True),
    dict(min_width=0.3), dict(min_height=0.25), dict(min_derivative=0.0),
    dict(min_width=-1e-3),
])
def test_bad_spline_options(kwargs):
    options = dict(inverse=False, bound=2.0) | kwargs
    with pytest.raises(ConfigError):
        rational_quadratic_spline(torch.zeros(3), *raw_params((3,), 4), **options)


def test_mismatched_parameter_shapes():
    w, h, d = raw_params((3,), 4)
    for bad in ((w, h, d[..., :2]), (w, h[..., :3], d), (w[..., :0], h[..., :0], d)):
        with pytest.raises(DataError):
            rational_quadratic_spline(torch.zeros(3), *bad, inverse=False, bound=2.0)


# -- the transforms -----------------------------------------------------------------------------
def batch_jacobian(fn, x):
    full = torch.func.jacrev(fn)(x)  # (batch, dim, batch, dim)
    idx = torch.arange(x.shape[0])
    blocks = full[idx, :, idx, :]
    off = full.clone()
    off[idx, :, idx, :] = 0
    assert off.abs().max() == 0, "events must not interact"
    return blocks


def spline_layers():
    layers = [
        ("coupling", RQSCoupling(5, bins=6, bound=2.0, hidden=(16,)), None),
        ("coupling-odd", RQSCoupling(4, bins=4, bound=2.0, hidden=(16, 16), parity=1), None),
        ("coupling-conditional", RQSCoupling(4, bins=5, bound=2.0, hidden=(16,), context_dim=3),
         torch.randn(6, 3)),
        ("autoregressive", RQSAutoregressive(4, bins=5, bound=2.0, hidden=(16,),
                                             order=[2, 0, 3, 1]), None),
        ("autoregressive-conditional", RQSAutoregressive(3, bins=4, bound=2.0, hidden=(16,),
                                                         context_dim=2), torch.randn(6, 2)),
    ]
    out = []
    for i, (name, layer, context) in enumerate(layers):
        randomize_(layer, std=0.3, generator=torch.Generator().manual_seed(i))
        out.append((name, layer.to(F64), None if context is None else context.to(F64)))
    return out


@pytest.mark.parametrize("case", spline_layers(), ids=lambda c: c[0])
def test_transform_round_trip_and_logdet_against_autograd(case):
    _, layer, context = case
    dim = layer.dim
    x = 1.5 * torch.randn(6, dim, dtype=F64)
    x[0, 1], x[1, 0] = 3.5, -2.0  # a tail and an edge (of a changed feature either parity)
    y, ladj = layer(x, context)
    assert (y - x).abs().max() > 0.1 and ladj.abs().max() > 0.1
    back, ladj_inv = layer.inverse(y, context)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ladj_inv, -ladj, rtol=0, atol=1e-10)
    jac = batch_jacobian(lambda z: layer(z, context)[0], x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    y2 = 1.5 * torch.randn(6, dim, dtype=F64)
    x2, ladj2 = layer.inverse(y2, context)
    jac_inv = batch_jacobian(lambda z: layer.inverse(z, context)[0], y2)
    torch.testing.assert_close(ladj2, torch.linalg.slogdet(jac_inv)[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x2, context)[0], y2, rtol=0, atol=1e-10)


def test_coupling_keeps_its_half():
    layer = randomize_(RQSCoupling(5, bound=2.0, hidden=(8,), parity=1))
    x = torch.randn(7, 5)
    y, _ = layer(x)
    assert torch.equal(y[:, 1::2], x[:, 1::2])
    assert (y[:, 0::2] != x[:, 0::2]).any()
    jac = batch_jacobian(lambda z: layer(z)[0], x)
    # each changed feature reads only itself among the changed ones
    changed = jac[:, 0::2][..., 0::2]
    assert (changed - torch.diag_embed(torch.diagonal(changed, dim1=1, dim2=2))).abs().max() == 0


def test_autoregressive_is_triangular_in_order_and_passes():
    order = [2, 0, 3, 1]
    layer = randomize_(RQSAutoregressive(4, bins=5, bound=2.0, hidden=(16,), order=order))
    layer = layer.to(F64)
    x = torch.randn(3, 4, dtype=F64)
    o = torch.tensor(order)
    jac = batch_jacobian(lambda z: layer(z)[0], x)[:, o][..., o]
    assert jac.triu(1).abs().max() == 0 and (jac.tril(-1).abs() > 0).any()
    calls = []
    handle = layer.made.register_forward_hook(lambda *_: calls.append(1))
    layer(x)
    assert len(calls) == 1
    layer.inverse(x)
    assert len(calls) == 1 + 4
    handle.remove()


def test_fresh_transforms_start_at_the_identity():
    x = 2 * torch.randn(5, 4)
    for layer in (RQSCoupling(4), RQSAutoregressive(4)):
        for direction in (layer.forward, layer.inverse):
            y, ladj = direction(x)
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
            torch.testing.assert_close(ladj, torch.zeros(5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: RQSCoupling(4, bins=5, bound=2.0, hidden=(16,), context_dim=2),
    lambda: RQSAutoregressive(4, bins=5, bound=2.0, hidden=(16,), context_dim=2),
], ids=["coupling", "autoregressive"])
def test_context_changes_outputs(make):
    layer = randomize_(make(), std=0.5).to(F64)
    x = torch.randn(6, 4, dtype=F64)
    for direction in (layer.forward, layer.inverse):
        a, la = direction(x, torch.zeros(6, 2, dtype=F64))
        b, lb = direction(x, torch.ones(6, 2, dtype=F64))
        assert (a - b).abs().max() > 1e-3 and (la - lb).abs().max() > 1e-3


@pytest.mark.parametrize("make,kwargs", [
    (RQSCoupling, dict(dim=1)), (RQSCoupling, dict(dim=4, parity=2)),
    (RQSCoupling, dict(dim=4, parity=True)), (RQSCoupling, dict(dim=4, bins=0)),
    (RQSCoupling, dict(dim=4, bound=0.0)), (RQSCoupling, dict(dim=4, context_dim=0)),
    (RQSCoupling, dict(dim=4, hidden=(0,))), (RQSCoupling, dict(dim=4, bins=2000)),
    (RQSAutoregressive, dict(dim=0)), (RQSAutoregressive, dict(dim=3, bins=0)),
    (RQSAutoregressive, dict(dim=3, bound=-1.0)), (RQSAutoregressive, dict(dim=3, order=[1, 2])),
    (RQSAutoregressive, dict(dim=3, context_dim=0)),
])
def test_bad_options(make, kwargs):
    with pytest.raises(ConfigError):
        make(**kwargs)


@pytest.mark.parametrize("make", [RQSCoupling, RQSAutoregressive])
def test_bad_inputs_and_contexts(make):
    conditional, plain = make(4, context_dim=2), make(4)
    x = torch.randn(3, 4)
    for direction in ("forward", "inverse"):
        for context in (None, torch.randn(3, 3), torch.randn(2, 2), torch.randn(3, 2, 1)):
            with pytest.raises(DataError):
                getattr(conditional, direction)(x, context)
        with pytest.raises(DataError):
            getattr(plain, direction)(x, torch.randn(3, 2))
        for bad in (torch.randn(3, 5), torch.randn(4), torch.ones(3, 4, dtype=torch.long)):
            with pytest.raises(DataError):
                getattr(plain, direction)(bad)


def test_examples_hit_the_interior_and_the_tails():
    expected = {"rqs-coupling": ((4,), None), "rqs-coupling-conditional": ((4,), 3),
                "rqs-autoregressive": ((3,), None), "rqs-autoregressive-conditional": ((3,), 2)}
    for name, (shape, context_dim) in expected.items():
        example = EXAMPLES[name]
        assert (example.event_shape, example.context_dim) == (shape, context_dim)
        layer = example.build()
        x = example.scale * torch.randn(200, *shape)
        assert 0.05 < (x.abs() > layer.bound).float().mean() < 0.5
        context = None if context_dim is None else torch.randn(200, context_dim)
        y, ladj = layer(x, context)
        assert (y - x).abs().max() > 0.05 and ladj.abs().max() > 0.05
        assert math.isclose(layer.bound, 2.0)
