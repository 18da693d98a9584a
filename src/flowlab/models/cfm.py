"""A CNF trained by conditional flow matching (Lipman et al. 2023; Tong et al. 2024).

The model is the FFJORD object itself (one CNF block on ``t in [0, 1]``, data at 0, noise at
1), so ``log_prob`` is the exact instantaneous change of variables, ``sample`` and the
trajectories are those of the ODE; only the training objective differs: the vector field is
regressed on the velocity of a probability path between data and noise, with no ODE solve.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowlab.errors import ConfigError
from flowlab.fm import averaged_target, check_target, make_coupling, make_path
from flowlab.models.base import LossOutput, register_model
from flowlab.models.ffjord import FFJORD

TIME_SAMPLING = ("uniform", "logit-normal")
# forward-difference step of the Sobolev term's field Jacobian: in float32 its rounding error is
# about 1e-7 |v| / h and its truncation error h |d^2 v| / 2, both far below the noise of the
# target Jacobian for data scaled to about unit size
SOBOLEV_STEP = 1e-3
# the Sobolev term costs one field evaluation per chosen row and data dimension
SOBOLEV_MAX_DIM = 16


@register_model("cfm")
class CFM(FFJORD):
    """Flow-matching CNF.

    Args:
        path: ``linear`` (the optimal-transport path with ``sigma_min``) or ``vp``.
        sigma_min: width of the linear path at the data end.
        coupling: ``independent`` pairs or minibatch optimal transport (``ot``).
        ot_block: points per exact OT assignment (the batch is matched in blocks of this
            size; None: the whole batch at once). See :mod:`flowlab.fm.coupling` for the cost.
        ot_solver: ``auto`` (POT if installed, else scipy), ``pot`` or ``scipy``.
        time_sampling: how training times are drawn: ``uniform`` on [0, 1], or
            ``logit-normal`` (sigmoid of a standard normal; more weight mid-path, as in
            Esser et al. 2024).
        target: the regression target: the ``conditional`` velocity of each pair, or its
            posterior average over the batch (``averaged``; independent coupling only; see
            :mod:`flowlab.fm.targets`), a lower-variance target for the same field.
        sobolev: weight of a Sobolev term (0: off; averaged target only): for up to
            ``sobolev_rows`` rows of each batch with ``t >= sobolev_from`` the field's Jacobian
            in the state (forward differences) is regressed on the Jacobian of the averaged
            target, ``sobolev * sum |J_field - J_target|_F^2 / batch`` added to the loss. Its
            expected value in the target is the marginal field's Jacobian (up to the averaged
            target's own ``1 / batch`` bias), so it changes how fast the field's Jacobian
            error falls, not what the field converges to. It exists because the likelihood
            integrates the field's divergence: on 8gaussians the averaged target's fields
            carry a Jacobian error that more training does not lower, and this term lowers it
            (README, time-to-quality). Low-dimensional data only (it costs one field
            evaluation per chosen row and dimension; at most 16 dimensions).
        sobolev_from, sobolev_rows: the earliest time of the rows it uses (in (0, 1); near the
            data end the batch posterior is a single point and its covariance, the target
            Jacobian's noisy part, is no estimate at all) and how many rows per batch.
        Other arguments as :class:`FFJORD`; the integration time is fixed at T = 1 and there
        is one block (the path defines the whole flow).
    """

    def __init__(
        self,
        dim: int | None = None,
        path: str = "linear",
        sigma_min: float = 1e-4,
        coupling: str = "independent",
        ot_block: int | None = 128,
        ot_solver: str = "auto",
        time_sampling: str = "uniform",
        target: str = "conditional",
        sobolev: float = 0.0,
        sobolev_from: float = 0.25,
        sobolev_rows: int = 64,
        **options: Any,
    ):
        for name, required in (("T", 1.0), ("train_T", False), ("num_blocks", 1)):
            if options.setdefault(name, required) != required:
                raise ConfigError(f"a flow-matching model has {name}={required}, got "
                                  f"{options[name]}")
        if time_sampling not in TIME_SAMPLING:
            raise ConfigError(f"unknown time_sampling {time_sampling!r}; choose one of "
                              f"{', '.join(TIME_SAMPLING)}")
        if check_target(target) == "averaged" and coupling != "independent":
            raise ConfigError("the averaged target is the posterior average over independent "
                              f"pairs; coupling={coupling!r} pairs each point with noise chosen "
                              "from the whole batch. Use coupling='independent' with it")
        _check_sobolev(sobolev, sobolev_from, sobolev_rows, target, dim)
        probability_path = make_path(path, sigma_min)
        pairing = make_coupling(coupling, ot_block, ot_solver)
        super().__init__(dim, **options)
        self.path, self.coupling = probability_path, pairing
        self.options.update(path=path, sigma_min=sigma_min, coupling=coupling, ot_block=ot_block,
                            ot_solver=ot_solver, time_sampling=time_sampling, target=target)
        if sobolev > 0:  # (saved only when on, so that older runs keep their options)
            self.options.update(sobolev=float(sobolev), sobolev_from=float(sobolev_from),
                                sobolev_rows=int(sobolev_rows))

    def sample_times(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Training times in (0, 1) drawn by the ``time_sampling`` rule."""
        if self.options["time_sampling"] == "logit-normal":
            return torch.sigmoid(torch.randn(n, dtype=like.dtype, device=like.device))
        return torch.rand(n, dtype=like.dtype, device=like.device)

    def training_loss(self, x: torch.Tensor, z: torch.Tensor | None = None) -> LossOutput:
        """The flow-matching regression loss on a batch of data.

        With ``z`` given, ``(x[i], z[i])`` are used as the pairs as they are (rectified flow
        trains on pairs produced by a teacher model); otherwise noise is drawn and coupled.
        """
        x = self.check_input(x)
        if z is None:
            x, z = self.coupling(x, torch.randn_like(x))
        elif self.options["target"] == "averaged":
            raise ConfigError("given pairs (rectified flow) are trained on as they are; the "
                              "averaged target would replace them by the batch average. Use "
                              "target='conditional' with given pairs")
        elif z.shape != x.shape:
            raise ConfigError(f"pairs differ in shape: data {tuple(x.shape)}, noise "
                              f"{tuple(z.shape)}")
        else:
            z = z.to(x)
        t = self.sample_times(x.shape[0], x)
        point, velocity = self.path.point_and_velocity(x, z, t)
        if self.options.get("sobolev", 0.0) > 0:
            return self._sobolev_loss(x, z, t, point, velocity)
        if self.options["target"] == "averaged":
            velocity = averaged_target(self.path, x, z, t, velocity)[0]
        predicted = self.blocks[0].field(t, point)
        loss = (predicted - velocity).pow(2).flatten(1).sum(dim=1).mean()
        return LossOutput(loss, {"cfm_loss": float(loss.detach()), "nfe_forward": 0.0})

    def _sobolev_loss(self, x, z, t, point, velocity) -> LossOutput:
        """The averaged-target regression plus the Sobolev term (see ``sobolev``)."""
        n, dim = x.shape
        rows = (t >= self.options["sobolev_from"]).nonzero().squeeze(1)
        rows = rows[: self.options["sobolev_rows"]]
        velocity, target_jacobian = averaged_target(self.path, x, z, t, velocity, rows)
        k = rows.numel()
        # every chosen row again, moved by SOBOLEV_STEP along each axis: one field call for all
        steps = SOBOLEV_STEP * torch.eye(dim, dtype=point.dtype, device=point.device)
        moved = (point[rows][:, None, :] + steps[None]).reshape(k * dim, dim)
        out = self.blocks[0].field(torch.cat([t, t[rows].repeat_interleave(dim)]),
                                   torch.cat([point, moved]))
        predicted = out[:n]
        # [row, moved axis j, output i] -> [row, i, j]
        jacobian = ((out[n:].reshape(k, dim, dim) - predicted[rows][:, None, :]) / SOBOLEV_STEP
                    ).transpose(1, 2)
        regression = (predicted - velocity).pow(2).sum(dim=1).mean()
        sobolev = (jacobian - target_jacobian.to(jacobian)).pow(2).sum(dim=(1, 2)).sum() / n
        loss = regression + self.options["sobolev"] * sobolev
        return LossOutput(loss, {"cfm_loss": float(regression.detach()),
                                 "sobolev_loss": float(sobolev.detach()), "nfe_forward": 0.0})


def _check_sobolev(weight: float, start: float, rows: int, target: str, dim: int | None) -> None:
    if not (weight >= 0 and math.isfinite(weight)):
        raise ConfigError(f"sobolev must be a finite weight >= 0 (0: off), got {weight}")
    if weight == 0:
        return
    if target != "averaged":
        raise ConfigError("the Sobolev term regresses the field's Jacobian on that of the "
                          "averaged target; the conditional velocity's Jacobian is not an "
                          "estimate of the marginal field's. Use target='averaged' with it")
    if dim is None or dim > SOBOLEV_MAX_DIM:
        raise ConfigError(f"the Sobolev term takes one field evaluation per chosen row and data "
                          f"dimension, for vector data of at most {SOBOLEV_MAX_DIM} dimensions; "
                          f"got {'image data' if dim is None else f'{dim} dimensions'}. "
                          "Drop sobolev for this data")
    if not 0 < start < 1:
        raise ConfigError(f"sobolev_from must be in (0, 1), got {start}")
    if int(rows) != rows or rows < 1:
        raise ConfigError(f"sobolev_rows must be a positive integer, got {rows}")
