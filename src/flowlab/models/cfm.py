"""A CNF trained by conditional flow matching (Lipman et al. 2023; Tong et al. 2024).

The model is the FFJORD object itself (one CNF block on ``t in [0, 1]``, data at 0, noise at
1), so ``log_prob`` is the exact instantaneous change of variables, ``sample`` and the
trajectories are those of the ODE; only the training objective differs: the vector field is
regressed on the velocity of a probability path between data and noise, with no ODE solve.
"""

from __future__ import annotations

from typing import Any

import torch

from flowlab.errors import ConfigError
from flowlab.fm import averaged_velocity, check_target, make_coupling, make_path
from flowlab.models.base import LossOutput, register_model
from flowlab.models.ffjord import FFJORD

TIME_SAMPLING = ("uniform", "logit-normal")


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
        probability_path = make_path(path, sigma_min)
        pairing = make_coupling(coupling, ot_block, ot_solver)
        super().__init__(dim, **options)
        self.path, self.coupling = probability_path, pairing
        self.options.update(path=path, sigma_min=sigma_min, coupling=coupling, ot_block=ot_block,
                            ot_solver=ot_solver, time_sampling=time_sampling, target=target)

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
        if self.options["target"] == "averaged":
            velocity = averaged_velocity(self.path, x, z, t, velocity)
        predicted = self.blocks[0].field(t, point)
        loss = (predicted - velocity).pow(2).flatten(1).sum(dim=1).mean()
        return LossOutput(loss, {"cfm_loss": float(loss.detach()), "nfe_forward": 0.0})
