"""Probability paths between data and noise, and their conditional velocities.

flowlab's time convention (the CNF's): data at ``t = 0``, the standard Gaussian at ``t = 1``.
A path gives, for a data point ``x``, a noise draw ``z`` and a time ``t``, the point ``x_t``
on the path and the velocity ``u_t = d x_t / dt`` that flow matching regresses the vector
field on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowlab.errors import ConfigError


def _column(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(like).reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class LinearPath:
    """The optimal-transport path of Lipman et al. (2023), run from data to noise.

    ``x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) z``: a straight line from ``x``
    (blurred by ``sigma_min``) at ``t = 0`` to ``z`` at ``t = 1``, with the constant velocity
    ``u = (1 - sigma_min) z - x``.
    """

    sigma_min: float = 1e-4

    def __post_init__(self) -> None:
        if not (0 <= self.sigma_min < 1):
            raise ConfigError(f"sigma_min must be in [0, 1), got {self.sigma_min}")

    def point_and_velocity(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
        tt = _column(t, x)
        s = self.sigma_min
        return (1 - tt) * x + (s + (1 - s) * tt) * z, (1 - s) * z - x


@dataclass(frozen=True)
class VPPath:
    """A variance-preserving (trigonometric) path: ``x_t = cos(pi t / 2) x + sin(pi t / 2) z``."""

    def point_and_velocity(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
        angle = _column(t, x) * (math.pi / 2)
        point = torch.cos(angle) * x + torch.sin(angle) * z
        velocity = (math.pi / 2) * (torch.cos(angle) * z - torch.sin(angle) * x)
        return point, velocity


PATHS = ("linear", "vp")


def make_path(name: str, sigma_min: float = 1e-4) -> LinearPath | VPPath:
    if name == "linear":
        return LinearPath(sigma_min)
    if name == "vp":
        return VPPath()
    raise ConfigError(f"unknown probability path {name!r}; choose one of {', '.join(PATHS)}")
