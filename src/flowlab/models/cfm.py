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
from flowlab.fm import make_coupling, make_path
from flowlab.models.base import LossOutput, register_model
from flowlab.models.ffjord import FFJORD


@register_model("cfm")
class CFM(FFJORD):
    """Flow-matching CNF.

    Args:
        path: ``linear`` (the optimal-transport path with ``sigma_min``) or ``vp``.
        sigma_min: width of the linear path at the data end.
        coupling: ``independent`` pairs or minibatch optimal transport (``ot``).
        Other arguments as :class:`FFJORD`; the integration time is fixed at T = 1 and there
        is one block (the path defines the whole flow).
    """

    def __init__(
        self,
        dim: int,
        path: str = "linear",
        sigma_min: float = 1e-4,
        coupling: str = "independent",
        **options: Any,
    ):
        for name, required in (("T", 1.0), ("train_T", False), ("num_blocks", 1)):
            if options.setdefault(name, required) != required:
                raise ConfigError(f"a flow-matching model has {name}={required}, got "
                                  f"{options[name]}")
        probability_path, pairing = make_path(path, sigma_min), make_coupling(coupling)
        super().__init__(dim, **options)
        self.path, self.coupling = probability_path, pairing
        self.options.update(path=path, sigma_min=sigma_min, coupling=coupling)

    def training_loss(self, x: torch.Tensor) -> LossOutput:
        x = self.check_input(x)
        z = torch.randn_like(x)
        x, z = self.coupling(x, z)
        t = torch.rand(x.shape[0], dtype=x.dtype, device=x.device)
        point, velocity = self.path.point_and_velocity(x, z, t)
        predicted = self.blocks[0].field(t, point)
        loss = (predicted - velocity).pow(2).flatten(1).sum(dim=1).mean()
        return LossOutput(loss, {"cfm_loss": float(loss.detach()), "nfe_forward": 0.0})
