"""FFJORD (Grathwohl, Chen et al. 2019): a stack of CNF blocks on a standard Gaussian base."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowlab.cnf import CNF, ConvVectorField, MLPVectorField, sample_probe
from flowlab.cnf.divergence import PROBES
from flowlab.cnf.dynamics import DIVERGENCES
from flowlab.errors import ConfigError
from flowlab.models.base import DensityModel, LossOutput, register_model, standard_normal_log_prob
from flowlab.nets import UNetVectorField
from flowlab.ode import SolverConfig, SolveStats


@dataclass
class FlowResult:
    """Points pushed through the whole stack, with the summed log|det J| and solve stats."""

    z: torch.Tensor
    log_det: torch.Tensor
    regularizers: dict[str, torch.Tensor]
    stats: list[SolveStats]


@register_model("ffjord")
class FFJORD(DensityModel):
    """Continuous normalizing flow density ``log p(x) = log N(z(T)) + int_0^T tr(df/dz) dt``.

    Data -> noise is the forward direction (blocks in order, each from t=0 to its T); sampling
    runs the blocks in reverse order, each from its T back to 0.

    Args:
        dim: dimension of the data (vectors; or give ``image_shape``).
        hidden: hidden widths of each block's vector field (channels for ``conv``; for
            ``unet`` the first is the base channel count and the others set the channels of
            the lower resolutions, e.g. ``(32, 64)``).
        layer: time conditioning (``concat``, ``concatsquash``, ``ignore``).
        activation: ``tanh``, ``softplus``, ``swish``, ``elu``.
        image_shape: ``(C, H, W)`` for images.
        field: ``mlp`` (vectors), ``conv`` (FFJORD's concatsquash convolutions) or ``unet``
            (a time-embedded U-Net, for flow matching) on images.
        num_blocks: number of stacked CNF blocks.
        T: initial integration time of each block; ``train_T`` learns it.
        divergence: used in training: ``exact`` or ``hutchinson``.
        probe: Hutchinson probe distribution, ``rademacher`` or ``gaussian``.
        solver: training solver (dict of :class:`SolverConfig` fields).
        eval_solver: solver used in eval mode (``model.eval()``) and by ``flowlab eval``.
        eval_divergence: divergence in eval mode (``exact`` by default: no estimator noise).
        kinetic, jacobian: RNODE regularizer weights (0 disables them).
    """

    def __init__(
        self,
        dim: int | None = None,
        hidden: Sequence[int] = (64, 64, 64),
        layer: str = "concatsquash",
        activation: str = "tanh",
        num_blocks: int = 1,
        T: float = 0.5,
        train_T: bool = True,
        divergence: str = "exact",
        probe: str = "rademacher",
        solver: dict | SolverConfig | None = None,
        eval_solver: dict | SolverConfig | None = None,
        eval_divergence: str = "exact",
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        image_shape: Sequence[int] | None = None,
        field: str = "mlp",
    ):
        if (dim is None) == (image_shape is None):
            raise ConfigError("give dim (vectors) or image_shape (C, H, W), not both or neither")
        shape = (int(dim),) if image_shape is None else tuple(int(s) for s in image_shape)
        if field not in FIELDS or (field == "mlp") != (len(shape) == 1):
            raise ConfigError(f"field {field!r} does not fit shape {shape}: use mlp for vectors, "
                              "conv or unet for (C, H, W) images")
        super().__init__(shape)
        if num_blocks < 1:
            raise ConfigError(f"num_blocks must be at least 1, got {num_blocks}")
        for name, value, allowed in (
            ("divergence", divergence, DIVERGENCES),
            ("eval_divergence", eval_divergence, DIVERGENCES),
            ("probe", probe, PROBES),
        ):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if kinetic < 0 or jacobian < 0:
            raise ConfigError(
                f"regularizer weights must be >= 0, got kinetic={kinetic}, jacobian={jacobian}"
            )
        self.options = {
            "dim": dim, "hidden": [int(h) for h in hidden], "layer": layer,
            "activation": activation, "num_blocks": num_blocks, "T": T, "train_T": train_T,
            "divergence": divergence, "probe": probe, "eval_divergence": eval_divergence,
            "kinetic": kinetic, "jacobian": jacobian,
        }
        self.solver = _as_solver(solver, SolverConfig())
        self.eval_solver = _as_solver(eval_solver, SolverConfig(atol=1e-6, rtol=1e-6))
        if image_shape is not None:  # (stored only when used: older configs stay equal)
            self.options.update(image_shape=list(shape), field=field)
        self.blocks = nn.ModuleList(
            CNF(_make_field(field, shape, hidden, layer, activation), T, train_T, divergence)
            for _ in range(num_blocks)
        )

    def config(self) -> dict[str, Any]:
        return {
            **self.options,
            "solver": self.solver.to_dict(),
            "eval_solver": self.eval_solver.to_dict(),
        }

    # -- the maps ---------------------------------------------------------------------------
    def _run(
        self,
        x: torch.Tensor,
        reverse: bool,
        solver: SolverConfig | None,
        divergence: str | None,
        regularize: bool = False,
        generator: torch.Generator | None = None,
    ) -> FlowResult:
        solver = solver or (self.solver if self.training else self.eval_solver)
        divergence = divergence or (
            self.options["divergence"] if self.training else self.options["eval_divergence"]
        )
        kinetic = regularize and self.options["kinetic"] > 0
        jacobian = regularize and self.options["jacobian"] > 0
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        regs: dict[str, torch.Tensor] = {}
        stats = []
        blocks = reversed(self.blocks) if reverse else self.blocks
        z = x
        for block in blocks:
            # One probe per block solve, drawn here by the caller and fixed for the solve.
            probe = (sample_probe(z, self.options["probe"], generator)
                     if divergence == "hutchinson" else None)
            out = block(
                z, reverse=reverse, solver=solver, probe=probe, divergence=divergence,
                kinetic=kinetic, jacobian=jacobian,
            )
            z, log_det = out.z, log_det + out.log_det
            for name, value in out.regularizers.items():
                regs[name] = regs.get(name, 0) + value
            stats.append(out.stats)
        return FlowResult(z, log_det, regs, stats)

    def to_noise(self, x: torch.Tensor, **kwargs) -> FlowResult:
        """Data -> noise: ``z`` and ``log|det dz/dx|`` (keyword options as in ``log_prob``)."""
        return self._run(self.check_input(x), reverse=False, **_run_options(kwargs))

    def to_data(self, z: torch.Tensor, *, solver: SolverConfig | None = None) -> torch.Tensor:
        """Noise -> data (no divergence needed, so it is skipped)."""
        return self.to_data_with_stats(z, solver=solver)[0]

    def to_data_with_stats(
        self, z: torch.Tensor, *, solver: SolverConfig | None = None
    ) -> tuple[torch.Tensor, list[SolveStats]]:
        """``to_data`` and the :class:`SolveStats` of each block's solve, in solve order."""
        solver = solver or (self.solver if self.training else self.eval_solver)
        stats = []
        for block in reversed(self.blocks):
            traj, block_stats = block.trajectory(z, torch.tensor([1.0, 0.0]), solver=solver)
            z = traj[-1]
            stats.append(block_stats)
        return z, stats

    def sample_and_log_prob(
        self, sample_shape: torch.Size | tuple[int, ...] = (), *, solver: SolverConfig | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and their model log-density from one noise -> data solve (no gradient).

        ``log q(x) = log N(z) - log|det dx/dz|``, the divergence integrated along the sampling
        solve itself, so no second (data -> noise) solve is needed.
        """
        shape = torch.Size(sample_shape)
        z = self.base_sample(shape).reshape(-1, *self.event_shape)
        with torch.no_grad():
            result = self._run(z, reverse=True, solver=solver, divergence=None)
        log_q = standard_normal_log_prob(z) - result.log_det
        return result.z.reshape(*shape, *self.event_shape), log_q.reshape(shape)

    def log_prob(
        self,
        x: torch.Tensor,
        *,
        solver: SolverConfig | None = None,
        divergence: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Log-density in nats ``(batch,)``.

        In eval mode the defaults are ``eval_solver`` and ``eval_divergence`` (exact and tight);
        in train mode the training ones. ``generator`` seeds Hutchinson probes.
        """
        return self.log_prob_with_stats(
            x, solver=solver, divergence=divergence, generator=generator
        )[0]

    def log_prob_with_stats(self, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list]:
        """``log_prob`` and the :class:`SolveStats` of each block's solve."""
        result = self.to_noise(x, **kwargs)
        return standard_normal_log_prob(result.z) + result.log_det, result.stats

    def trajectory(
        self,
        x: torch.Tensor,
        steps_per_block: int = 20,
        *,
        fractions: Sequence[float] | torch.Tensor | None = None,
        to_data: bool = True,
        solver: SolverConfig | None = None,
    ) -> torch.Tensor:
        """Positions along the flow: ``(frames, batch, dim)``, frame 0 being ``x``.

        ``to_data=True`` starts from noise ``x`` and ends at data; False goes the other way.
        Each block is visited at the times ``fractions * T`` (increasing values from 0 to 1,
        read in the direction of travel: 0 is where the block is entered), by default
        ``steps_per_block`` equal steps.
        """
        solver = solver or self.eval_solver
        if fractions is None:
            grid = torch.linspace(0.0, 1.0, steps_per_block + 1)
        else:
            grid = torch.as_tensor(fractions, dtype=torch.float64).float()
            if grid.ndim != 1 or len(grid) < 2 or grid[0] != 0 or grid[-1] != 1 or \
                    not bool((grid[1:] > grid[:-1]).all()):
                raise ConfigError(
                    "fractions must increase strictly from 0 to 1, e.g. [0, 0.25, 0.5, 1]"
                )
        frames = [x.unsqueeze(0)]
        z = x
        blocks = reversed(self.blocks) if to_data else self.blocks
        for block in blocks:
            # Noise -> data runs each block from its T back to 0.
            times = 1.0 - grid if to_data else grid
            traj, _ = block.trajectory(z, times, solver=solver)
            frames.append(traj[1:])
            z = traj[-1]
        return torch.cat(frames, dim=0)

    # -- training ---------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor) -> LossOutput:
        result = self._run(self.check_input(x), reverse=False, solver=None, divergence=None,
                           regularize=True)
        nll = -(standard_normal_log_prob(result.z) + result.log_det).mean()
        loss = nll
        metrics = {"nll": float(nll.detach())}
        for name, value in result.regularizers.items():
            mean = value.mean()
            loss = loss + self.options[name] * mean
            metrics[name] = float(mean.detach())
        metrics["nfe_forward"] = float(sum(s.nfe_forward for s in result.stats))
        metrics["T"] = float(sum(float(b.T.detach()) for b in self.blocks))
        return LossOutput(loss, metrics, result.stats)


FIELDS = ("mlp", "conv", "unet")


def _make_field(field: str, shape: tuple[int, ...], hidden: Sequence[int], layer: str,
                activation: str) -> nn.Module:
    if field == "mlp":
        return MLPVectorField(shape[0], hidden, layer, activation)
    if field == "conv":
        return ConvVectorField(shape, tuple(hidden), layer, activation)
    hidden = [int(h) for h in hidden]
    if not hidden or any(h < 1 or h % hidden[0] for h in hidden):
        raise ConfigError(f"unet widths must be multiples of the first, e.g. 32,64; got {hidden}")
    return UNetVectorField(shape, channels=hidden[0],
                           channel_mult=tuple(h // hidden[0] for h in hidden))


def _as_solver(value: dict | SolverConfig | None, default: SolverConfig) -> SolverConfig:
    if value is None:
        return default
    if isinstance(value, SolverConfig):
        return value
    try:
        return SolverConfig(**value)
    except TypeError as err:
        raise ConfigError(f"invalid solver options {value}: {err}") from err


def _run_options(kwargs: dict) -> dict:
    allowed = {"solver", "divergence", "generator", "regularize"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ConfigError(f"unknown options {sorted(unknown)}; allowed: {sorted(allowed)}")
    return {"solver": None, "divergence": None, **kwargs}
