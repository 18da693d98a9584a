"""Tests of the CNF pieces against independent answers.

Divergences against the autograd Jacobian; Hutchinson estimators by their sample mean and
variance against closed forms, with bounds tight enough to reject a biased estimator; CNF blocks
against the linear ODE's closed form (matrix exponential, Gaussian densities) and against the
autograd Jacobian of the flow map; RNODE regularizers against quadrature. All in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import simpson
from torch import nn
from torch.distributions import MultivariateNormal

from flowlab.cnf import (
    ACTIVATIONS,
    CNF,
    LAYERS,
    AugmentedDynamics,
    MLPVectorField,
    divergence_exact,
    divergence_hutchinson,
    sample_probe,
)
from flowlab.errors import ConfigError
from flowlab.models import standard_normal_log_prob
from flowlab.ode import SolverConfig, odeint

F64 = torch.float64
TIGHT = SolverConfig(atol=1e-11, rtol=1e-11)




def make_field(dim=3, layer="concatsquash", activation="tanh", seed=0, gain=3.0):
    """A float64 MLPVectorField whose weights are scaled up so that its Jacobian is O(1)."""
    torch.manual_seed(seed)
    field = MLPVectorField(dim, (16, 16), layer, activation).to(F64)
    with torch.no_grad():
        for p in field.parameters():
            p.mul_(gain)
    return field


def batch_jacobian(field, t, z):
    """Per-sample Jacobians (batch, dim, dim) from autograd's full (batch, dim, batch, dim)."""
    full = torch.autograd.functional.jacobian(lambda x: field(t, x), z)
    idx = torch.arange(z.shape[0])
    blocks = full[idx, :, idx, :]
    off = full.clone()
    off[idx, :, idx, :] = 0
    assert off.abs().max() == 0, "samples must not interact"
    return blocks


class LinearField(nn.Module):
    """dz/dt = A z (rows of z are samples), A fixed."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)

    def forward(self, t, z):
        return z @ self.A.T


A3 = torch.tensor([[-0.5, 1.0, 0.2], [-1.0, 0.3, 0.4], [0.6, -0.4, -0.7]], dtype=F64)
# CNF stores sqrt(T) in the default dtype (float32) before .to(float64); 0.5625 = 0.75^2 is
# exact in both, so the closed forms below can use the nominal T.
T_LIN = 0.5625


def linear_cnf(T=T_LIN, train_T=False, divergence="exact"):
    cnf = CNF(LinearField(A3), T=T, train_T=train_T, divergence=divergence).to(F64)
    assert float(cnf.T.detach()) == T
    return cnf


# -- divergences ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_divergence_exact_is_jacobian_trace(layer, activation):
    field = make_field(layer=layer, activation=activation)
    t = torch.tensor(0.37, dtype=F64)
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    J = batch_jacobian(field, t, z)
    zg = z.clone().requires_grad_(True)
    div, frob = divergence_exact(field(t, zg), zg, create_graph=False, with_frobenius=True)
    trace = J.diagonal(dim1=1, dim2=2).sum(-1)
    assert trace.abs().min() > 1e-2  # a nontrivial trace for every sample
    torch.testing.assert_close(div, trace, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frob, J.pow(2).sum((1, 2)), rtol=1e-12, atol=1e-12)
    div_only, none = divergence_exact(field(t, zg), zg, create_graph=False)
    assert none is None
    torch.testing.assert_close(div_only, trace, rtol=1e-12, atol=1e-12)


def test_divergence_exact_differentiable_in_parameters():
    # create_graph=True: the divergence's parameter gradient equals that of the autograd trace.
    field = make_field(seed=2)
    t = torch.tensor(0.5, dtype=F64)
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    zg = z.clone().requires_grad_(True)
    div, frob = divergence_exact(field(t, zg), zg, create_graph=True, with_frobenius=True)
    params = list(field.parameters())

    def grads(loss):
        # The time shift d t of concatsquash does not enter the Jacobian: its gradient is 0.
        found = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found,
                                                                          strict=True)]

    mine = grads((div + 0.3 * frob).sum())
    full = torch.autograd.functional.jacobian(lambda x: field(t, x), z, create_graph=True)
    idx = torch.arange(4)
    J = full[idx, :, idx, :]
    ref = grads(J.diagonal(dim1=1, dim2=2).sum() + 0.3 * J.pow(2).sum())
    assert max(float(g.abs().max()) for g in ref) > 1e-2
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_single_probe_is_quadratic_form(kind):
    # For a fixed probe the estimate is exactly eps^T J eps, and frob is ||eps^T J||^2.
    field = make_field(seed=3)
    t = torch.tensor(0.2, dtype=F64)
    z = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    J = batch_jacobian(field, t, z)
    eps = sample_probe(z, kind, torch.Generator().manual_seed(4))
    zg = z.clone().requires_grad_(True)
    div, frob = divergence_hutchinson(field(t, zg), zg, eps, create_graph=False)
    eJ = torch.einsum("bi,bij->bj", eps, J)
    torch.testing.assert_close(div, (eJ * eps).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(frob, eJ.pow(2).sum(1), rtol=1e-12, atol=1e-12)


def _many_probe_estimates(field, t, z, kind, n, seed):
    """(n, batch) Hutchinson estimates of div and frob with n independent probes per point."""
    zr = z.repeat(n, 1).requires_grad_(True)
    eps = sample_probe(zr, kind, torch.Generator().manual_seed(seed))
    div, frob = divergence_hutchinson(field(t, zr), zr, eps, create_graph=False)
    return div.reshape(n, -1), frob.reshape(n, -1)


@pytest.fixture(scope="module")
def estimator_case():
    field = make_field()
    t = torch.tensor(0.6, dtype=F64)
    # Of 200 random points keep the 4 whose trace is largest relative to the estimator's
    # spread, so that a 10% bias is detectable with a modest number of probes.
    candidates = torch.randn(200, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    J = torch.func.vmap(torch.func.jacrev(lambda x: field(t, x[None])[0]))(candidates)
    S = (J + J.transpose(1, 2)) / 2
    snr = J.diagonal(dim1=1, dim2=2).sum(-1).abs() / S.pow(2).sum((1, 2)).sqrt()
    z = candidates[snr.argsort(descending=True)[:4]]
    J = batch_jacobian(field, t, z)
    n = 40_000
    est = {kind: _many_probe_estimates(field, t, z, kind, n, seed=6) for kind in
           ("gaussian", "rademacher")}
    return J, n, est


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_divergence_unbiased(estimator_case, kind):
    J, n, est = estimator_case
    div = est[kind][0]
    exact = J.diagonal(dim1=1, dim2=2).sum(-1)
    mean, se = div.mean(0), div.std(0) / math.sqrt(n)
    # Two-sided: the mean is within 4 s.e. of the exact trace ...
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # ... and the s.e. is small relative to |trace|, so a 10% bias would be rejected:
    assert (4 * se < 0.05 * exact.abs()).all(), (se, exact)
    biased = 1.1 * mean
    assert ((biased - exact).abs() > 4 * se).all()


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_frobenius_unbiased(estimator_case, kind):
    J, n, est = estimator_case
    frob = est[kind][1]
    exact = J.pow(2).sum((1, 2))
    mean, se = frob.mean(0), frob.std(0) / math.sqrt(n)
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert (4 * se < 0.05 * exact).all()


def test_hutchinson_variances_match_theory_rademacher_lower(estimator_case):
    # Var[eps^T J eps] = 2||S||_F^2 (Gaussian) and 2||S||_F^2 - 2 sum_i J_ii^2 (Rademacher),
    # S the symmetric part of J.
    J, n, est = estimator_case
    S = (J + J.transpose(1, 2)) / 2
    var_g = 2 * S.pow(2).sum((1, 2))
    var_r = var_g - 2 * J.diagonal(dim1=1, dim2=2).pow(2).sum(-1)
    sample_g, sample_r = est["gaussian"][0].var(0), est["rademacher"][0].var(0)
    torch.testing.assert_close(sample_g, var_g, rtol=0.1, atol=0)
    torch.testing.assert_close(sample_r, var_r, rtol=0.1, atol=0)
    assert (sample_r < sample_g).all()
    assert (var_r <= var_g).all()


def test_sample_probe():
    like = torch.zeros(50_000, 4, dtype=F64)
    g = sample_probe(like, "gaussian", torch.Generator().manual_seed(0))
    r = sample_probe(like, "rademacher", torch.Generator().manual_seed(0))
    for probe in (g, r):
        assert probe.shape == like.shape and probe.dtype == F64
        assert probe.mean().abs() < 0.02 and (probe.var() - 1).abs() < 0.02
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert g.unique().numel() > 1000
    again = sample_probe(like, "gaussian", torch.Generator().manual_seed(0))
    assert torch.equal(g, again)
    assert sample_probe(like.float(), "rademacher").dtype == torch.float32
    with pytest.raises(ConfigError):
        sample_probe(like, "uniform")


def test_field_time_dependence_by_layer():
    z = torch.randn(3, 2, dtype=F64)
    t0, t1 = torch.tensor(0.0, dtype=F64), torch.tensor(0.9, dtype=F64)
    for layer in LAYERS:
        field = make_field(dim=2, layer=layer)
        out0, out1 = field(t0, z), field(t1, z)
        assert out0.shape == z.shape
        if layer == "ignore":
            assert torch.equal(out0, out1)
        else:
            assert (out0 - out1).abs().max() > 1e-3


@pytest.mark.parametrize(
    "options",
    [{"layer": "gated"}, {"activation": "relu6"}, {"hidden": (16, 0)}, {"dim": 0}],
)
def test_field_invalid_options(options):
    with pytest.raises(ConfigError):
        MLPVectorField(**{"dim": 2, "hidden": (8,), **options})


def test_dynamics_and_cnf_invalid_options():
    field = make_field(dim=2)
    with pytest.raises(ConfigError):
        AugmentedDynamics(field, divergence="approximate")
    with pytest.raises(ConfigError):
        AugmentedDynamics(field, divergence="hutchinson")  # needs a probe
    with pytest.raises(ConfigError):
        CNF(field, T=0.0)
    with pytest.raises(ConfigError):
        CNF(field, T=-1.0)
    with pytest.raises(ConfigError):
        CNF(field, divergence="approximate")


# -- linear dynamics: closed forms ----------------------------------------------------------------


@pytest.mark.parametrize(
    "solver", [TIGHT, SolverConfig("rk4", steps=200)], ids=["dopri5", "rk4"]
)
def test_linear_cnf_log_det_and_map(solver):
    cnf = linear_cnf()
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    out = cnf(x, solver=solver)
    expm = torch.linalg.matrix_exp(A3 * T_LIN)
    trace = torch.trace(A3)
    assert abs(float(trace)) > 0.5
    torch.testing.assert_close(out.z, x @ expm.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.log_det, torch.full((6,), T_LIN * float(trace), dtype=F64),
                               rtol=1e-9, atol=1e-9)
    back = cnf(out.z, reverse=True, solver=solver)
    torch.testing.assert_close(back.z, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back.log_det, -out.log_det, rtol=1e-9, atol=1e-9)
    assert out.stats.nfe_forward > 0 and out.regularizers == {}


def test_linear_cnf_gaussian_density():
    # z ~ N(0, I) pushed to data by x = expm(-A T) z is N(0, M M^T); the CNF's density
    # log N(z_T) + log_det must equal that Gaussian's, at random points.
    cnf = linear_cnf()
    M = torch.linalg.matrix_exp(-A3 * T_LIN)
    data_dist = MultivariateNormal(torch.zeros(3, dtype=F64), covariance_matrix=M @ M.T)
    x = 1.5 * torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(8))
    out = cnf(x, solver=TIGHT)
    model = standard_normal_log_prob(out.z) + out.log_det
    torch.testing.assert_close(model, data_dist.log_prob(x), rtol=1e-9, atol=1e-9)
    # Sign check with teeth: the other sign of log_det is far off.
    wrong = standard_normal_log_prob(out.z) - out.log_det
    assert (wrong - data_dist.log_prob(x)).abs().min() > 0.5
    # Sampling direction: base points mapped noise -> data land where x = M z says.
    z = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(cnf(z, reverse=True, solver=TIGHT).z, z @ M.T, rtol=1e-9,
                               atol=1e-9)


def test_linear_cnf_hutchinson_log_det():
    # Per solve the estimate is T eps^T A eps (the probe is fixed along the solve); averaged
    # over probes it is T tr(A).
    cnf = linear_cnf(divergence="hutchinson")
    n = 20_000
    x = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    eps = sample_probe(x, "rademacher", torch.Generator().manual_seed(11))
    out = cnf(x, solver=SolverConfig(atol=1e-9, rtol=1e-9), probe=eps)
    per_probe = T_LIN * ((eps @ A3.T) * eps).sum(1)
    torch.testing.assert_close(out.log_det, per_probe, rtol=1e-7, atol=1e-7)
    exact = T_LIN * float(torch.trace(A3))
    log_det = out.log_det.detach()
    mean, se = float(log_det.mean()), float(log_det.std()) / math.sqrt(n)
    assert abs(mean - exact) < 4 * se
    assert 4 * se < 0.05 * abs(exact)
    torch.testing.assert_close(out.z, x @ torch.linalg.matrix_exp(A3 * T_LIN).T, rtol=1e-7,
                               atol=1e-7)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_linear_cnf_gradient_in_learned_time(gradient):
    # log_det = T tr(A) with T = s^2: d log_det / ds = 2 s tr(A); z_T = expm(A s^2) x.
    cnf = linear_cnf(train_T=True)
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    out = cnf(x, solver=TIGHT.replace(gradient=gradient))
    s = float(cnf.sqrt_T.detach())
    (g_logdet,) = torch.autograd.grad(out.log_det.sum(), [cnf.sqrt_T], retain_graph=True)
    torch.testing.assert_close(g_logdet, torch.tensor(4 * 2 * s * float(torch.trace(A3)),
                                                      dtype=F64), rtol=1e-9, atol=1e-9)
    (g_z,) = torch.autograd.grad(out.z.sum(), [cnf.sqrt_T])
    expected = (x @ (A3 @ torch.linalg.matrix_exp(A3 * s * s)).T).sum() * 2 * s
    torch.testing.assert_close(g_z, expected, rtol=1e-8, atol=1e-8)


def test_linear_cnf_regularizers_closed_form():
    cnf = linear_cnf()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(13))
    out = cnf(x, solver=TIGHT, kinetic=True, jacobian=True)
    assert set(out.regularizers) == {"kinetic", "jacobian"}
    # kinetic = int_0^T ||A expm(A t) x||^2 dt by Simpson's rule on the closed-form path.
    ts = np.linspace(0.0, T_LIN, 2001)
    speeds = np.stack([
        (x @ (A3 @ torch.linalg.matrix_exp(A3 * float(s))).T).pow(2).sum(1).numpy() for s in ts
    ])
    kinetic = torch.tensor(simpson(speeds, x=ts, axis=0))
    torch.testing.assert_close(out.regularizers["kinetic"], kinetic, rtol=1e-9, atol=1e-9)
    # jacobian (exact mode) = T ||A||_F^2 for every sample.
    frob = T_LIN * float(A3.pow(2).sum())
    torch.testing.assert_close(out.regularizers["jacobian"], torch.full((5,), frob, dtype=F64),
                               rtol=1e-9, atol=1e-9)
    # Reverse reports the same integrals over [0, T], not negated ones.
    back = cnf(out.z, reverse=True, solver=TIGHT, kinetic=True, jacobian=True)
    for name in ("kinetic", "jacobian"):
        torch.testing.assert_close(back.regularizers[name], out.regularizers[name], rtol=1e-8,
                                   atol=1e-8)
    # The regularizer channels do not disturb the flow.
    plain = cnf(x, solver=TIGHT)
    torch.testing.assert_close(out.z, plain.z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.log_det, plain.log_det, rtol=1e-9, atol=1e-9)


def test_linear_cnf_hutchinson_jacobian_regularizer_unbiased():
    # Per solve: T ||eps^T A||^2; averaged over probes: T ||A||_F^2.
    cnf = linear_cnf(divergence="hutchinson")
    n = 20_000
    x = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(14))
    eps = sample_probe(x, "gaussian", torch.Generator().manual_seed(15))
    out = cnf(x, solver=SolverConfig(atol=1e-9, rtol=1e-9), probe=eps, jacobian=True)
    jac = out.regularizers["jacobian"].detach()
    torch.testing.assert_close(jac, T_LIN * (eps @ A3).pow(2).sum(1), rtol=1e-7, atol=1e-7)
    exact = T_LIN * float(A3.pow(2).sum())
    mean, se = float(jac.mean()), float(jac.std()) / math.sqrt(n)
    assert abs(mean - exact) < 4 * se
    assert 4 * se < 0.05 * exact


# -- nonlinear fields --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_cnf():
    return CNF(make_field(dim=2, seed=22, gain=2.0), T=0.9).to(F64)


def test_cnf_log_det_is_log_det_of_flow_map_jacobian(mlp_cnf):
    # Independent of the divergence channel: differentiate the map x -> z(T) itself.
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(21))
    out = mlp_cnf(x, solver=TIGHT)

    def flow_map(points):
        traj, _ = mlp_cnf.trajectory(points, torch.tensor([0.0, 1.0]), solver=TIGHT)
        return traj[-1]

    full = torch.autograd.functional.jacobian(flow_map, x)
    idx = torch.arange(3)
    _, logabsdet = torch.linalg.slogdet(full[idx, :, idx, :])
    assert logabsdet.abs().max() > 0.05
    torch.testing.assert_close(out.log_det, logabsdet, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(out.z, flow_map(x), rtol=1e-8, atol=1e-9)


def test_cnf_forward_then_reverse_returns_input(mlp_cnf):
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(22))
    out = mlp_cnf(x, solver=TIGHT, kinetic=True, jacobian=True)
    assert (out.z - x).abs().max() > 0.1
    back = mlp_cnf(out.z, reverse=True, solver=TIGHT, kinetic=True, jacobian=True)
    torch.testing.assert_close(back.z, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back.log_det, -out.log_det, rtol=1e-8, atol=1e-8)
    for name in ("kinetic", "jacobian"):
        assert (out.regularizers[name] > 0).all()
        torch.testing.assert_close(back.regularizers[name], out.regularizers[name], rtol=1e-7,
                                   atol=1e-8)


def test_cnf_regularizers_against_quadrature_along_trajectory(mlp_cnf):
    field = mlp_cnf.field
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(23))
    out = mlp_cnf(x, solver=TIGHT, kinetic=True, jacobian=True)
    fractions = torch.linspace(0.0, 1.0, 401, dtype=F64)
    traj, _ = mlp_cnf.trajectory(x, fractions, solver=TIGHT)
    T = float(mlp_cnf.T.detach())
    times = fractions * T
    speed, frob = [], []
    for s, z in zip(times, traj, strict=True):
        speed.append(field(s, z).pow(2).sum(1).detach())
        frob.append(batch_jacobian(field, s, z.detach()).pow(2).sum((1, 2)))
    kinetic = simpson(torch.stack(speed).numpy(), x=times.numpy(), axis=0)
    jacobian = simpson(torch.stack(frob).numpy(), x=times.numpy(), axis=0)
    torch.testing.assert_close(out.regularizers["kinetic"], torch.tensor(kinetic), rtol=1e-7,
                               atol=1e-8)
    torch.testing.assert_close(out.regularizers["jacobian"], torch.tensor(jacobian), rtol=1e-7,
                               atol=1e-8)


def test_cnf_trajectory_endpoints(mlp_cnf):
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(24))
    fractions = torch.linspace(0.0, 1.0, 6)
    traj, stats = mlp_cnf.trajectory(x, fractions, solver=TIGHT)
    assert traj.shape == (6, 4, 2) and stats.nfe_forward > 0
    assert torch.equal(traj[0], x)
    torch.testing.assert_close(traj[-1], mlp_cnf(x, solver=TIGHT).z, rtol=1e-9, atol=1e-9)
    back, _ = mlp_cnf.trajectory(traj[-1], fractions.flip(0), solver=TIGHT)
    torch.testing.assert_close(back[-1], x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back.flip(0), traj, rtol=1e-8, atol=1e-8)


def test_augmented_dynamics_channels_match_parts():
    # One evaluation of the augmented field against its parts computed separately.
    field = make_field(dim=3, seed=25)
    z = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(25))
    t = torch.tensor(0.4, dtype=F64)
    dyn = AugmentedDynamics(field, kinetic=True, jacobian=True)
    assert dyn.num_channels == 4
    with torch.no_grad():
        f, div, kin, jac = dyn(t, (z, torch.zeros(4, dtype=F64), torch.zeros(4, dtype=F64),
                                   torch.zeros(4, dtype=F64)))
    J = batch_jacobian(field, t, z)
    torch.testing.assert_close(f, field(t, z).detach(), rtol=0, atol=0)
    torch.testing.assert_close(div, J.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kin, f.pow(2).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac, J.pow(2).sum((1, 2)), rtol=1e-12, atol=1e-12)
    assert not any(c.requires_grad for c in (f, div, kin, jac))


def test_cnf_solve_uses_one_probe_per_solve():
    # With a Hutchinson probe, the whole solve is a deterministic function of the probe: the
    # same probe gives the same log_det, a different one a different log_det.
    cnf = CNF(make_field(dim=2, seed=26), T=0.5, divergence="hutchinson").to(F64)
    x = torch.randn(5, 2, dtype=F64, generator=torch.Generator().manual_seed(26))
    eps = sample_probe(x, "rademacher", torch.Generator().manual_seed(27))
    a = cnf(x, probe=eps)
    b = cnf(x, probe=eps)
    c = cnf(x, probe=sample_probe(x, "rademacher", torch.Generator().manual_seed(28)))
    assert torch.equal(a.log_det, b.log_det)
    assert (a.log_det - c.log_det).abs().max() > 1e-6
    # divergence= overrides the block's choice for one call.
    exact = cnf(x, divergence="exact")
    assert not torch.equal(exact.log_det, a.log_det)


def test_odeint_of_augmented_dynamics_with_adjoint_matches_backprop():
    field = make_field(dim=2, seed=28, gain=2.0)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(28))
    grads = []
    for gradient in ("backprop", "adjoint"):
        dyn = AugmentedDynamics(field, kinetic=True, jacobian=True)
        state = (x, *[torch.zeros(4, dtype=F64)] * 3)
        t = torch.tensor([0.0, 0.7], dtype=F64, requires_grad=True)
        sol, _ = odeint(dyn, state, t, TIGHT.replace(gradient=gradient),
                        params=tuple(field.parameters()))
        z, logdet, kin, jac = (s[-1] for s in sol)
        loss = z.pow(2).sum() - logdet.sum() + 0.1 * kin.sum() + 0.1 * jac.sum()
        grads.append(torch.autograd.grad(loss, [*field.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_exact_divergence_of_an_image_field_is_the_trace_over_all_pixels():
    """On (batch, C, H, W) states the exact divergence is the trace of the Jacobian of the
    flattened field: here a fixed linear map of the 8 pixel values."""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(8, 8, generator=gen, dtype=F64)

    def field(t, z):
        return (z.flatten(1) @ matrix.T).reshape(z.shape)

    z = torch.randn(3, 2, 2, 2, dtype=F64, generator=gen, requires_grad=True)
    div, frob = divergence_exact(field(0.0, z), z, create_graph=False, with_frobenius=True)
    torch.testing.assert_close(div, torch.trace(matrix).expand(3))
    torch.testing.assert_close(frob, matrix.pow(2).sum().expand(3))
