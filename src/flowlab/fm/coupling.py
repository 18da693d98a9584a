"""Couplings of a batch of data with a batch of noise: independent, or minibatch optimal transport.

Minibatch OT (Tong et al. 2024; Pooladian et al. 2023) pairs each data point with a noise
draw by an exact assignment minimizing the summed squared distances on the batch, which
straightens the learned paths. The assignment is solved with scipy's Hungarian-type solver on
the CPU, O(n^3) in the batch size.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from flowlab.errors import ConfigError

COUPLINGS = ("independent", "ot")


def independent_coupling(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs as drawn."""
    return x, z


def ot_coupling(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder ``z`` so that ``sum_i ||x_i - z_i||^2`` is minimal over all pairings."""
    if x.shape[0] != z.shape[0]:
        raise ConfigError(f"batch sizes differ: {x.shape[0]} data points, {z.shape[0]} noise")
    cost = torch.cdist(x.detach().flatten(1).double(), z.detach().flatten(1).double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = torch.as_tensor(cols[np.argsort(rows)], device=z.device)
    return x, z[order]


def make_coupling(name: str):
    if name == "independent":
        return independent_coupling
    if name == "ot":
        return ot_coupling
    raise ConfigError(f"unknown coupling {name!r}; choose one of {', '.join(COUPLINGS)}")
