"""What every flowlab density model offers, and the registry that builds them by name.

A model is an ``nn.Module`` that behaves like a ``torch.distributions.Distribution`` over
``event_shape``-shaped points: ``log_prob``, ``sample``, ``rsample``. Its **forward direction
maps data to noise** (``to_noise``); ``to_data`` maps noise to data. It also knows its own
training objective (``training_loss``) and can describe itself as a JSON-serializable config
from which :func:`build_model` rebuilds it, so that checkpoints never need pickles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from flowlab.errors import ConfigError, DataError
from flowlab.ode import SolveStats

MODELS: dict[str, type[DensityModel]] = {}


def register_model(name: str) -> Callable[[type[DensityModel]], type[DensityModel]]:
    """Class decorator: make a model buildable by ``name`` (CLI ``--model name``)."""

    def decorate(cls: type[DensityModel]) -> type[DensityModel]:
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return decorate


def build_model(name: str, **options: Any) -> DensityModel:
    """Build a registered model from its name and options (a config from ``model.config()``)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](**options)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over all but the first axis: ``(batch, ...) -> (batch,)``."""
    flat = z.flatten(1)
    return -0.5 * (flat.pow(2).sum(dim=1) + flat.shape[1] * math.log(2 * math.pi))


@dataclass
class LossOutput:
    """What ``training_loss`` returns.

    Attributes:
        loss: scalar to minimize.
        metrics: floats to log (``nll`` in nats, regularizer values, ``nfe_forward``...).
        stats: the solves of this loss; their ``nfe_backward`` is known after ``backward()``.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    stats: list[SolveStats] = field(default_factory=list)


class DensityModel(nn.Module):
    """Base class of flowlab's density models (see the module docstring)."""

    name: str = "abstract"

    def __init__(self, event_shape: tuple[int, ...]):
        super().__init__()
        self.event_shape = tuple(int(s) for s in event_shape)

    # -- to implement ---------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density in nats of each point: ``(batch, *event_shape) -> (batch,)``."""
        raise NotImplementedError

    def to_data(self, z: torch.Tensor) -> torch.Tensor:
        """The noise -> data map applied to base samples ``(batch, *event_shape)``."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor) -> LossOutput:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serializable options such that ``build_model(self.name, **config)`` rebuilds it."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def _reference(self) -> torch.Tensor:
        for tensor in self.parameters():
            return tensor
        return torch.zeros(())

    def base_sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        ref = self._reference()
        shape = torch.Size(sample_shape)
        return torch.randn((*shape, *self.event_shape), dtype=ref.dtype, device=ref.device)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Samples that are differentiable with respect to the parameters."""
        shape = torch.Size(sample_shape)
        z = self.base_sample(shape).reshape(-1, *self.event_shape)
        return self.to_data(z).reshape(*shape, *self.event_shape)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Samples, shape ``(*sample_shape, *event_shape)``, without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate a batch of data points, with an error that names the problem."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"expected a torch.Tensor of points, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.event_shape or x.ndim != len(self.event_shape) + 1:
            raise DataError(
                f"expected points of shape (batch, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if not torch.is_floating_point(x):
            raise DataError(f"expected floating-point points, got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).flatten(1).any(dim=1).sum())
            raise DataError(f"{bad} of {x.shape[0]} points contain NaN or Inf values")
        return x

    def data_init(self, *batch: torch.Tensor) -> None:
        """Data-dependent initialization from a first training batch (default: none)."""

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
