"""Planar and radial layers against independent answers.

Log-determinants against ``torch.func.jacrev`` + ``slogdet`` in float64 in both directions,
the planar root finder against scipy's ``brentq``, gradients of the numerical inverse against
finite differences (``gradcheck``), and the invertibility constraints for arbitrary, also
adversarial, raw parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq

from flowlab.errors import ConfigError, DataError
from flowlab.transforms.base import EXAMPLES, Inverse, randomize_
from flowlab.transforms.planar import Planar, Radial, solve_planar_root

F64 = torch.float64
DIMS = [1, 2, 3, 5]


def _planar(dim: int, m: float | None = None, seed: int = 0, w_norm: float = 1.3) -> Planar:
    """A random planar layer; ``m`` sets ``w.u_hat`` exactly (through the raw ``w.u``)."""
    gen = torch.Generator().manual_seed(seed)
    layer = randomize_(Planar(dim), std=0.7, generator=gen).double()
    with torch.no_grad():
        layer.w.mul_(w_norm / layer.w.norm())
        if m is not None:
            raw = math.log(math.expm1(m + 1.0))  # softplus(raw) - 1 = m
            w = layer.w
            layer.u.add_((raw - w @ layer.u) / (w @ w) * w)
        layer.b.fill_(0.3)
    return layer


def _radial(dim: int, raw_alpha: float, raw_beta: float, seed: int = 0) -> Radial:
    gen = torch.Generator().manual_seed(seed)
    layer = randomize_(Radial(dim), std=0.7, generator=gen).double()
    with torch.no_grad():
        layer.raw_alpha.fill_(raw_alpha)
        layer.raw_beta.fill_(raw_beta)
    return layer


# (layer factory, label): contracting, expanding and nearly degenerate settings
CASES = [
    (lambda d: _planar(d, m=-0.5), "planar-contracting"),
    (lambda d: _planar(d, m=2.0), "planar-expanding"),
    (lambda d: _planar(d, m=-0.97, w_norm=0.8), "planar-near-degenerate"),
    (lambda d: _radial(d, 0.2, 1.5), "radial-expanding"),
    (lambda d: _radial(d, 1.0, -0.5), "radial-contracting"),
    (lambda d: _radial(d, 0.5, -3.0), "radial-near-degenerate"),
]


def _logdet(fn, point: torch.Tensor) -> torch.Tensor:
    jac = torch.func.jacrev(lambda v: fn(v[None])[0][0])(point)
    sign, logabs = torch.linalg.slogdet(jac)
    assert sign > 0  # both layers preserve orientation
    return logabs


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("build, label", CASES, ids=[c[1] for c in CASES])
def test_log_determinants_match_autograd_jacobians_both_ways(build, label, dim):
    layer = build(dim)
    x = 1.5 * torch.randn(5, dim, dtype=F64)
    y, ladj = layer(x)
    x_back, ladj_inv = layer.inverse(y)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-12, rtol=1e-12)
    for i in range(x.shape[0]):
        torch.testing.assert_close(ladj[i], _logdet(layer, x[i]), atol=1e-9, rtol=1e-9)
        # from the noise side at points no forward pass produced
        z = torch.randn(dim, dtype=F64)
        _, l_z = layer.inverse(z[None])
        torch.testing.assert_close(l_z[0], _logdet(layer.inverse, z), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("build, label", CASES, ids=[c[1] for c in CASES])
def test_round_trips_to_1e_10_in_float64(build, label, dim):
    layer = build(dim)
    with torch.no_grad():
        for scale in (0.1, 1.0, 10.0):
            x = scale * torch.randn(200, dim, dtype=F64)
            y, _ = layer(x)
            torch.testing.assert_close(layer.inverse(y)[0], x, atol=1e-10, rtol=1e-10)
            z = scale * torch.randn(200, dim, dtype=F64)
            x2, _ = layer.inverse(z)
            torch.testing.assert_close(layer(x2)[0], z, atol=1e-10, rtol=1e-10)


def test_root_finder_agrees_with_brentq_and_meets_its_tolerance():
    c = torch.tensor([-1e3, -30.0, -2.0, -0.3, -1e-9, 0.0, 1e-12, 0.01, 0.7, 4.0, 55.0, 1e4],
                     dtype=F64)
    for m in (-1.0, -0.999999, -0.9, -0.5, 0.0, 0.3, 3.0, 250.0, 1e5):
        a = solve_planar_root(c, torch.tensor(m, dtype=F64))
        residual = a + m * torch.tanh(a) - c
        assert (residual.abs() <= 1e-12 * (1 + c.abs())).all(), (m, residual)
        for ci, ai in zip(c.tolist(), a.tolist(), strict=True):
            spread = abs(m) + 1.0
            ref = brentq(lambda t, ci=ci, m=m: t + m * math.tanh(t) - ci, ci - spread, ci + spread,
                         xtol=1e-15, rtol=1e-15, maxiter=500)
            # m = -1 makes a = 0 a triple root of c = a - tanh a ~ a^3 / 3: there the root is
            # only determined to the cube root of the rounding in c
            tol = 1e-9 if m == -1.0 and abs(ci) < 1e-6 else 1e-11 * (1 + abs(ref))
            assert abs(ai - ref) <= tol, (m, ci, ai, ref)


def test_root_finder_handles_a_batch_of_mixed_difficulty_and_empty_input():
    c = torch.linspace(-50, 50, 10001, dtype=F64)
    a = solve_planar_root(c, torch.tensor(-0.999, dtype=F64))
    assert ((a - 0.999 * torch.tanh(a) - c).abs() <= 1e-12 * (1 + c.abs())).all()
    assert solve_planar_root(torch.empty(0, dtype=F64), torch.tensor(0.5)).shape == (0,)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0, 1e3])
def test_planar_constraint_holds_for_any_raw_parameters(scale):
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        dim = 1 + trial % 6
        layer = Planar(dim).double()
        with torch.no_grad():
            layer.w.copy_(scale * torch.randn(dim, generator=gen, dtype=F64))
            layer.u.copy_(scale * torch.randn(dim, generator=gen, dtype=F64))
            if trial % 3 == 0:
                layer.u.copy_(-10.0 * layer.w)  # adversarial: w.u very negative
            u_hat, m = layer.constrained()
            dot = float(layer.w @ u_hat)
            # w.u_hat is computed as w.u + (m - w.u) |w|^2 / |w|^2: exact up to rounding on
            # the scale of |w||u|
            rounding = 1e-12 * (1.0 + float(layer.w.norm() * layer.u.norm()))
        assert float(m) >= -1.0  # m = -1 + softplus(w.u), the value the solver uses
        assert dot >= -1.0 - rounding
        assert abs(dot - float(m)) <= rounding


@pytest.mark.parametrize("dim", [2, 4])
def test_planar_with_adversarial_u_stays_invertible(dim):
    layer = _planar(dim, w_norm=1.0)
    with torch.no_grad():
        layer.u.copy_(-10.0 * layer.w)  # w.u = -10: w.u_hat = -1 + softplus(-10) ~ -1 + 4.5e-5
    with torch.no_grad():
        _, m = layer.constrained()
    assert -1.0 < float(m) < -0.9999
    z = 2.0 * torch.randn(300, dim, dtype=F64)
    with torch.no_grad():
        x, ladj_inv = layer.inverse(z)
        z_back, ladj = layer(x)
    assert torch.isfinite(ladj).all() and torch.isfinite(ladj_inv).all()
    # the map is nearly singular along w near a = 0, so the round trip loses digits there
    torch.testing.assert_close(z_back, z, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(ladj, -ladj_inv, atol=1e-6, rtol=1e-6)


def test_radial_constraint_holds_for_any_raw_parameters():
    gen = torch.Generator().manual_seed(2)
    raws = [(a, b) for a in (-40.0, -3.0, 0.0, 2.0, 40.0) for b in (-40.0, -3.0, 0.0, 2.0, 40.0)]
    raws += [tuple((10 * torch.randn(2, generator=gen)).tolist()) for _ in range(50)]
    for raw_alpha, raw_beta in raws:
        layer = _radial(3, raw_alpha, raw_beta)
        with torch.no_grad():
            alpha, beta = layer.coefficients()
        assert float(alpha) > 0 and float(beta) >= -float(alpha)
    # beta = -alpha exactly (the boundary) is still invertible away from z0
    layer = _radial(2, 40.0, -40.0)
    with torch.no_grad():
        alpha, beta = layer.coefficients()
    assert float(beta) == -float(alpha)
    z = layer.z0.detach() + torch.randn(100, 2, dtype=F64) + 0.1
    with torch.no_grad():
        x, _ = layer.inverse(z)
        torch.testing.assert_close(layer(x)[0], z, atol=1e-10, rtol=1e-10)


def test_radial_at_its_centre_and_planar_with_w_zero_are_well_defined():
    layer = _radial(3, 0.3, -0.2)
    with torch.no_grad():
        y, ladj = layer(layer.z0.detach()[None])
    torch.testing.assert_close(y[0], layer.z0.detach())
    assert torch.isfinite(ladj).all()
    planar = _planar(3)
    with torch.no_grad():
        planar.w.zero_()  # the layer degenerates to a translation by u tanh(b)
    x = torch.randn(4, 3, dtype=F64)
    y, ladj = planar(x)
    torch.testing.assert_close(y, x - planar.u.detach() * math.tanh(0.3))
    torch.testing.assert_close(ladj, torch.zeros(4, dtype=F64))


def _functional(layer, direction: str):
    """``fn(x, *params)`` running the layer's ``direction`` with the given parameter values."""
    module = layer if direction == "forward" else Inverse(layer)
    names = [n for n, _ in module.named_parameters()]

    def fn(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params, strict=True)), (x,))

    return fn, [p.detach().clone().requires_grad_() for _, p in module.named_parameters()]


@pytest.mark.parametrize("build, label", CASES, ids=[c[1] for c in CASES])
def test_gradients_match_finite_differences(build, label):
    layer = build(2)
    x = torch.randn(3, 2, dtype=F64, requires_grad=True)
    for direction in ("forward", "inverse"):
        fn, params = _functional(layer, direction)
        assert torch.autograd.gradcheck(fn, (x, *params))


def test_planar_trains_by_maximum_likelihood():
    from flowlab.transforms import Compose

    torch.manual_seed(3)
    flow = Compose([Planar(2) for _ in range(4)]).double()
    data = torch.randn(512, 2, dtype=F64) * torch.tensor([2.0, 0.3], dtype=F64) + 1.0

    def nll():
        y, ladj = flow(data)
        return (0.5 * y.pow(2).sum(1) + math.log(2 * math.pi) - ladj).mean()

    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    with torch.no_grad():
        start = float(nll())
    for _ in range(60):
        opt.zero_grad()
        loss = nll()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(nll())
    assert end < start - 0.3, (start, end)


def test_float32_inputs_come_back_float32_and_close():
    layer = EXAMPLES["planar"].build()
    x = torch.randn(50, 2)
    y, ladj = layer(x)
    assert y.dtype == torch.float32 and ladj.dtype == torch.float32
    torch.testing.assert_close(layer.inverse(y)[0], x, atol=1e-5, rtol=1e-5)


def test_bad_options_and_inputs():
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ConfigError):
            Planar(bad)
        with pytest.raises(ConfigError):
            Radial(bad)
    for layer in (Planar(3), Radial(3)):
        with pytest.raises(DataError, match="shape"):
            layer(torch.randn(4, 2))
        with pytest.raises(DataError, match="shape"):
            layer.inverse(torch.randn(4))
        with pytest.raises(DataError, match="not conditional"):
            layer(torch.randn(4, 3), torch.randn(4, 1))
