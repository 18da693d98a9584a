"""One continuous normalizing flow block: an ODE from data time 0 to noise time T."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from flowlab.cnf.dynamics import DIVERGENCES, AugmentedDynamics
from flowlab.errors import ConfigError
from flowlab.ode import SolverConfig, SolveStats, odeint


@dataclass
class CNFOutput:
    """Result of pushing a batch through a CNF block.

    Attributes:
        z: the mapped points, shape of the input.
        log_det: ``(batch,)`` log |det d(output)/d(input)| of the map that was applied.
        regularizers: ``{"kinetic": (batch,), "jacobian": (batch,)}`` for the requested ones:
            time integrals of ``||f||^2`` and ``||df/dz||_F^2`` over ``[0, T]``.
        stats: the :class:`SolveStats` of the solve (NFE forward, and backward once known).
    """

    z: torch.Tensor
    log_det: torch.Tensor
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: SolveStats = field(default_factory=SolveStats)


class CNF(nn.Module):
    """A continuous normalizing flow ``dz/dt = f(t, z)`` on ``t in [0, T]``.

    Direction convention (the same everywhere in flowlab): **forward maps data to noise**,
    integrating from ``t = 0`` (data) to ``t = T`` (noise); **reverse maps noise to data**.

    Args:
        field: the vector field network ``f(t, z)``.
        T: the integration time. With ``train_T`` it is learned, parameterized as ``T = s^2``
            so that it stays positive.
        divergence: ``"exact"`` (``dim`` vector-Jacobian products) or ``"hutchinson"``.
    """

    def __init__(
        self,
        field: nn.Module,
        T: float = 0.5,
        train_T: bool = True,
        divergence: str = "exact",
    ):
        super().__init__()
        if not (T > 0):
            raise ConfigError(f"the integration time T must be positive, got {T}")
        if divergence not in DIVERGENCES:
            raise ConfigError(
                f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}"
            )
        self.field = field
        self.divergence = divergence
        self.sqrt_T = nn.Parameter(torch.tensor(float(T)).sqrt(), requires_grad=train_T)

    @property
    def T(self) -> torch.Tensor:
        return self.sqrt_T.pow(2)

    def _times(self, like: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        return fractions.to(like) * self.T.to(like)

    def forward(
        self,
        z: torch.Tensor,
        *,
        reverse: bool = False,
        solver: SolverConfig | None = None,
        probe: torch.Tensor | None = None,
        divergence: str | None = None,
        kinetic: bool = False,
        jacobian: bool = False,
    ) -> CNFOutput:
        """Map ``z`` (shape ``(batch, ...)``) through the flow.

        Args:
            reverse: False maps data -> noise (t: 0 -> T), True maps noise -> data (T -> 0).
            solver: how to solve (default ``SolverConfig()``).
            probe: the Hutchinson probe, drawn by the caller once for this solve; required when
                the divergence is ``"hutchinson"``.
            divergence: override the block's divergence for this call.
            kinetic, jacobian: also integrate the RNODE regularizers.
        """
        dynamics = AugmentedDynamics(
            self.field,
            divergence or self.divergence,
            probe=probe,
            kinetic=kinetic,
            jacobian=jacobian,
        )
        fractions = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0])
        times = self._times(z, fractions)
        zeros = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        state0 = (z, *([zeros] * (dynamics.num_channels - 1)))
        solution, stats = odeint(
            dynamics, state0, times, solver, params=tuple(self.field.parameters())
        )
        final = [s[-1] for s in solution]
        regs = {}
        names = [n for n, on in (("kinetic", kinetic), ("jacobian", jacobian)) if on]
        for name, value in zip(names, final[2:], strict=True):
            # Integrated along the direction of travel; report the integral over [0, T].
            regs[name] = -value if reverse else value
        return CNFOutput(final[0], final[1], regs, stats)

    def trajectory(
        self,
        z: torch.Tensor,
        fractions: torch.Tensor,
        *,
        solver: SolverConfig | None = None,
    ) -> tuple[torch.Tensor, SolveStats]:
        """Positions at times ``fractions * T`` (fractions in [0, 1], monotone).

        Starting point ``z`` is taken at ``fractions[0]``: ``fractions`` increasing from 0
        carries data to noise, decreasing from 1 carries noise to data. Returns
        ``(len(fractions), batch, ...)`` and the solve's stats. No divergence is computed.
        """
        times = self._times(z, torch.as_tensor(fractions))
        solution, stats = odeint(
            self.field, z, times, solver, params=tuple(self.field.parameters())
        )
        return solution, stats
