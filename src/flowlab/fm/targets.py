"""Regression targets for flow matching: the conditional velocity, or its average over the batch.

Conditional flow matching regresses the field at ``x_t`` on the velocity ``u_t(x_t | x)`` of
the one data point ``x`` that ``x_t`` was drawn from. The field it converges to is the
marginal velocity ``E[u_t(x_t | x) | x_t]``, the average over every data point that could
have produced ``x_t``; a single draw is a noisy estimate of it wherever several data points
are plausible (mid-path and near the noise end), and on a CPU budget that noise, not the
network, is what limits the fit.

The averaged target replaces the draw by the posterior average over the data points of the
batch (the stable target field of Xu et al. 2023, there for diffusion; here for the paths of
:mod:`flowlab.fm.paths`): with independent coupling, the point ``x_t`` of data point ``x_i``
is ``a(t) x_i + sigma(t) z_i``, so the batch points ``x_j`` have posterior weights
``w_ij ~ N(x_t; a x_j, sigma^2 I)`` and

    target_i = u_t(x_t | x_i) - gamma(t) * sum_j w_ij (x_j - x_i),

where ``u_t(x_t | x_j) - u_t(x_t | x_i) = -gamma(t) (x_j - x_i)`` for both paths
(``gamma = 1 / sigma`` on the linear path, ``(pi / 2) / sigma`` on the VP path). Near the
data end the weights sit on ``x_i`` itself and the target is the conditional one; near the
noise end it is an average over the whole batch. The estimate of the marginal velocity is
consistent, with a bias of order ``1 / batch size`` (the batch stands in for the data
distribution; Xu et al. 2023 bound it).

It is defined for independent pairs only: minibatch OT pairs ``x_i`` with a ``z_i`` that
depends on the rest of the batch, so the posterior above is not that of the pairs.

Measured on this project's 2-core machine (one core, 60-s budget, the Fourier field, batch
512, paired KL on 20,000 test points): 8gaussians 0.0265 nats with the conditional target,
0.0018-0.0025 with the averaged one (six runs); moons 0.0135 against 0.0032. The weights
cost an n x n softmax per step (2.6 ms of a 13.4-ms step at n = 512 with the Fourier field,
one core; ``benchmarks/fm_target_cost.py``), so the batch is the reference set: 4,096
reference points (the last eight batches) cut the steps in a minute by two thirds and ended
worse (0.0052). References must be fresh draws: a fixed pool's noise is the same at every step,
so it does not average out and the field learns it (the rows in t in [0.1, 0.5) against a fixed
pool of 4,096 points ended at 0.0133 nats, against 2,048 points drawn afresh each step at
0.0020). What is left is noise, not bias: near the data end the posterior is narrower
than the spacing of the batch, so the average there is the conditional velocity again
(``benchmarks/fm_target_noise.py`` scores both targets against the exact marginal velocity of
8gaussians). Most of that noise's share of the batch gradient is common to the rows, since
they all average over the same points; ``benchmarks/fm_gradient_noise.py`` measures it, and
two ways to cut it (fresh references per block of rows, score matching near the data end)
that left the one-minute result unchanged. See the time-to-quality account in the README.

:func:`averaged_target` also gives the averaged target's Jacobian in the path point, in closed
form, for the Sobolev term of :class:`flowlab.models.cfm.CFM` (``sobolev``): the likelihood
integrates the field's divergence, and on 8gaussians the fields trained on this target keep a
Jacobian error that more training does not lower; regressing the field's Jacobian on this one
took the one-minute KL from 0.0018 to 0.0014 nats (three runs each, side by side).
"""

from __future__ import annotations

import math

import torch

from flowlab.errors import ConfigError
from flowlab.fm.paths import LinearPath, VPPath

TARGETS = ("conditional", "averaged")

# the noise scale is clamped here so that t = 0 on a path without sigma_min puts all the weight
# on x_i itself (the target is then the conditional velocity) instead of computing 0 / 0
_TINY_SIGMA = 1e-12


def path_gaussian(path: LinearPath | VPPath, t: torch.Tensor):
    """``(a, sigma, gamma)`` per row: ``x_t | x ~ N(a x, sigma^2 I)`` (``sigma`` clamped at
    ``_TINY_SIGMA``) and the velocity spread.

    ``gamma`` is the factor with ``u_t(y | x_j) - u_t(y | x_i) = -gamma (x_j - x_i)`` for every
    point ``y``: the conditional velocity is affine in the data point with slope ``-gamma``.
    """
    if isinstance(path, LinearPath):
        s = path.sigma_min
        sigma = (s + (1 - s) * t).clamp_min(_TINY_SIGMA)
        return 1 - t, sigma, 1 / sigma
    if isinstance(path, VPPath):
        angle = t * (math.pi / 2)
        sigma = torch.sin(angle).clamp_min(_TINY_SIGMA)
        return torch.cos(angle), sigma, (math.pi / 2) / sigma
    raise ConfigError(f"the averaged target is defined for the linear and vp paths, not "
                      f"{type(path).__name__}")


def _posterior_weights(path: LinearPath | VPPath, x: torch.Tensor, z: torch.Tensor,
                       t: torch.Tensor):
    """Row ``i``'s posterior weights over the batch points ``x_j`` (float64, own point included)
    with the flattened points and the path scales per row: ``(weights, xs, a, sigma, gamma)``.

    The log-weight of ``x_j`` for row ``i`` is, up to a constant of the row,
    ``(a z_i / sigma + a^2 x_i / sigma^2) . x_j - a^2 |x_j|^2 / (2 sigma^2)``: one matrix
    product of the rows ``[a z_i / sigma + a^2 x_i / sigma^2, -a^2 / (2 sigma^2)]`` with the
    columns ``[x_j, |x_j|^2]``, in float64. Near the data end its terms grow like
    ``1 / sigma^2``, but so do the differences between the points' log-weights, so the weights
    keep their relative accuracy (float32 would lose every digit there).
    """
    n = x.shape[0]
    a, sigma, gamma = (v.reshape(n, 1) for v in path_gaussian(path, t.to(torch.float64)))
    xs = x.detach().reshape(n, -1).to(torch.float64)
    zs = z.detach().reshape(n, -1).to(torch.float64)
    rows = torch.cat([a * zs / sigma + (a / sigma).pow(2) * xs, -0.5 * (a / sigma).pow(2)], 1)
    columns = torch.cat([xs, xs.pow(2).sum(1, keepdim=True)], 1)
    return torch.softmax(rows @ columns.T, dim=1), xs, a, sigma, gamma


def averaged_velocity(path: LinearPath | VPPath, x: torch.Tensor, z: torch.Tensor,
                      t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The batch-posterior average of the conditional velocities (see the module docstring).

    Args:
        path: the probability path the pairs were put on.
        x, z: the independent pairs, shape ``(n, ...)``; the batch ``x`` is the reference set.
        t: one time per row, shape ``(n,)``.
        velocity: the conditional velocities ``u_t(x_t | x_i)`` of the rows.
    """
    return averaged_target(path, x, z, t, velocity)[0]


def averaged_target(path: LinearPath | VPPath, x: torch.Tensor, z: torch.Tensor,
                    t: torch.Tensor, velocity: torch.Tensor,
                    jacobian_rows: torch.Tensor | None = None):
    """The averaged target and, for the rows ``jacobian_rows`` (indices), its Jacobian with
    respect to the path point: ``(target, jacobians)``, the Jacobians ``(k, D, D)`` in float64
    (entry ``[i, j]`` the derivative of output ``i`` in input ``j``; None without rows).

    The conditional velocity is ``u_t(y | x) = (sigma' / sigma) y + (...) x``, affine in the
    point ``y`` with slope ``sigma' / sigma`` and in the data point with slope ``-gamma``, and the
    weights ``w_j(y)`` have gradient ``(a / sigma^2) w_j (x_j - m)`` with ``m`` the posterior
    mean, so the Jacobian of ``sum_j w_j u_t(y | x_j)`` is

        (sigma' / sigma) I - gamma (a / sigma^2) Cov_w(x),

    the weighted covariance of the batch points under the row's posterior. It is the target of
    the Sobolev term of :class:`flowlab.models.cfm.CFM` (see ``sobolev`` there).
    """
    weights, xs, a, sigma, gamma = _posterior_weights(path, x, z, t)
    jacobians = None
    if jacobian_rows is not None:
        w = weights[jacobian_rows]
        centred = xs[None] - (w @ xs)[:, None]  # (k, n, D)
        cov = torch.einsum("kj,kja,kjb->kab", w, centred, centred)
        rows = jacobian_rows
        rate = _noise_rate(path, a[rows], sigma[rows]).reshape(-1, 1, 1)
        eye = torch.eye(xs.shape[1], dtype=torch.float64, device=xs.device)
        scale = (gamma[rows] * a[rows] / sigma[rows].pow(2)).reshape(-1, 1, 1)
        jacobians = rate * eye - scale * cov
    weights.fill_diagonal_(0)  # x_i's own term, x_i - x_i = 0, contributes nothing
    shift = weights @ xs - weights.sum(1, keepdim=True) * xs
    target = velocity - (gamma * shift).reshape(velocity.shape).to(velocity)
    return target, jacobians


def _noise_rate(path: LinearPath | VPPath, a: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``sigma'(t) / sigma(t)`` from the scales of :func:`path_gaussian` (``sigma`` clamped):
    ``(1 - sigma_min) / sigma`` on the linear path, ``(pi / 2) a / sigma`` on the VP path."""
    if isinstance(path, LinearPath):
        return (1 - path.sigma_min) / sigma
    return (math.pi / 2) * a / sigma


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown flow-matching target {target!r}; choose one of "
                          f"{', '.join(TARGETS)}")
    return target
