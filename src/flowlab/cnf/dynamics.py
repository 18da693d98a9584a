"""Augmented dynamics of the instantaneous change of variables.

The ODE state is ``(z, log_det[, kinetic][, jacobian])`` with

* ``dz/dt = f(t, z)``;
* ``d log_det/dt = tr(df/dz)``, so that after integrating from ``t0`` to ``t1`` ``log_det`` is
  ``log |det dz(t1)/dz(t0)|`` (Liouville's formula);
* ``d kinetic/dt = ||f||^2`` and ``d jacobian/dt = ||df/dz||_F^2`` (or its unbiased estimate
  ``||eps^T df/dz||^2``): the RNODE regularizers of Finlay et al. 2020, integrated as extra
  channels of the same solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowlab.cnf.divergence import divergence_exact, divergence_hutchinson
from flowlab.errors import ConfigError

DIVERGENCES = ("exact", "hutchinson")


@dataclass
class AugmentedDynamics:
    """The right-hand side of the augmented ODE, for one solve.

    A fresh instance is made for every solve, holding that solve's Hutchinson probe, so no
    random state lives on a module.

    Attributes:
        field: the vector field ``f(t, z)``, ``z`` of shape ``(batch, ...)``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        probe: the Hutchinson probe (shape of ``z``), required for ``"hutchinson"``.
        kinetic: integrate ``||f||^2`` as an extra channel.
        jacobian: integrate the squared Jacobian Frobenius norm as an extra channel.
    """

    field: nn.Module
    divergence: str = "exact"
    probe: torch.Tensor | None = None
    kinetic: bool = False
    jacobian: bool = False

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ConfigError(
                f"unknown divergence {self.divergence!r}; choose 'exact' or 'hutchinson'"
            )
        if self.divergence == "hutchinson" and self.probe is None:
            raise ConfigError(
                "divergence='hutchinson' needs a probe drawn by the caller once per solve "
                "(see flowlab.cnf.sample_probe)"
            )

    @property
    def num_channels(self) -> int:
        return 2 + int(self.kinetic) + int(self.jacobian)

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]):
        z = state[0]
        grad_on = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (grad_on and z.requires_grad):
                # Outside autograd (evaluation, or torchdiffeq calling from a backward pass) z
                # may even be a view made in no-grad mode: start a fresh graph at z.
                z = z.detach().requires_grad_(True)
            f = self.field(t, z)
            if self.divergence == "exact":  # dim backward passes: exact but costly for images
                div, frob = divergence_exact(
                    f, z, create_graph=grad_on, with_frobenius=self.jacobian
                )
            else:
                div, frob = divergence_hutchinson(f, z, self.probe, create_graph=grad_on)
        out = [f, div]
        if self.kinetic:
            out.append(f.pow(2).flatten(1).sum(dim=1))
        if self.jacobian:
            out.append(frob)
        if not grad_on:
            out = [o.detach() for o in out]
        return tuple(out)
