"""What the CNF density models share: options, solver defaults, and one pass through blocks.

A CNF model (:class:`~flowlab.models.ffjord.FFJORD`, the multiscale
:class:`~flowlab.models.multiscale.MultiscaleFFJORD`) is a sequence of CNF blocks, possibly
with shape changes between them, on a standard normal base. Subclasses say how a pass goes
through their blocks (``_run``); everything else is here, written once:

* the checks and defaults of the training and evaluation settings (solver, divergence,
  Hutchinson probe, RNODE regularizer weights) and the JSON config;
* :class:`BlockPass`, the per-call record of one pass: it draws one Hutchinson probe per block
  solve (from the caller's generator, if any; never stored on a module) and sums the
  log-determinants, regularizers and solve stats;
* ``log_prob``, ``log_prob_with_stats``, ``to_noise``, ``to_data``, ``to_data_with_stats``,
  ``sample_and_log_prob`` and the maximum-likelihood ``training_loss``.

Direction: forward (``to_noise``) maps data to noise; ``to_data`` maps noise to data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowlab.cnf import CNF, sample_probe
from flowlab.cnf.divergence import PROBES
from flowlab.cnf.dynamics import DIVERGENCES
from flowlab.errors import ConfigError
from flowlab.models.base import DensityModel, LossOutput, standard_normal_log_prob
from flowlab.ode import SolverConfig, SolveStats


@dataclass
class FlowResult:
    """Points pushed through the whole model, with the summed log|det J| and solve stats.

    ``log_det`` is ``(batch,)`` log |det d(output)/d(input)| of the map applied (data -> noise
    or noise -> data); ``stats`` has one :class:`SolveStats` per block solve, in solve order.
    """

    z: torch.Tensor
    log_det: torch.Tensor
    regularizers: dict[str, torch.Tensor]
    stats: list[SolveStats]


@dataclass
class BlockPass:
    """One pass through a model's CNF blocks: the settings of each solve, and the running sums.

    Made afresh by every call (:meth:`CNFDensity._run`), so nothing measured or sampled is
    kept on a module. With ``density=False`` only the points are carried (no divergence, no
    log-determinant: sampling).
    """

    log_det: torch.Tensor
    solver: SolverConfig
    divergence: str
    probe: str
    kinetic: bool = False
    jacobian: bool = False
    generator: torch.Generator | None = None
    density: bool = True
    regularizers: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: list[SolveStats] = field(default_factory=list)

    def solve(self, block: CNF, z: torch.Tensor, reverse: bool) -> torch.Tensor:
        """``z`` through ``block`` (data -> noise, or noise -> data with ``reverse``)."""
        if not self.density:
            fractions = torch.tensor([1.0, 0.0] if reverse else [0.0, 1.0])
            traj, stats = block.trajectory(z, fractions, solver=self.solver)
            self.stats.append(stats)
            return traj[-1]
        # One probe per block solve, drawn here by the caller and fixed for the solve.
        probe = (sample_probe(z, self.probe, self.generator)
                 if self.divergence == "hutchinson" else None)
        out = block(
            z, reverse=reverse, solver=self.solver, probe=probe, divergence=self.divergence,
            kinetic=self.kinetic, jacobian=self.jacobian,
        )
        self.log_det = self.log_det + out.log_det
        for name, value in out.regularizers.items():
            self.regularizers[name] = self.regularizers.get(name, 0) + value
        self.stats.append(out.stats)
        return out.z

    def result(self, z: torch.Tensor) -> FlowResult:
        return FlowResult(z, self.log_det, self.regularizers, self.stats)


class CNFDensity(DensityModel):
    """Base class of the CNF models (see the module docstring).

    Subclasses set ``self.blocks`` (an ``nn.ModuleList`` of :class:`~flowlab.cnf.CNF`), add
    their architecture to ``self.options`` and implement ``_run``.

    Args:
        event_shape: shape of one data point.
        divergence, eval_divergence: ``exact`` or ``hutchinson``, in train and eval mode.
        probe: Hutchinson probe distribution, ``rademacher`` or ``gaussian``.
        solver, eval_solver: training and eval-mode solvers (:class:`SolverConfig` or dict).
        default_eval_solver: the eval solver when none is given.
        kinetic, jacobian: RNODE regularizer weights (0 disables them).
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        divergence: str,
        eval_divergence: str,
        probe: str,
        solver: dict | SolverConfig | None,
        eval_solver: dict | SolverConfig | None,
        default_eval_solver: SolverConfig,
        kinetic: float,
        jacobian: float,
    ):
        super().__init__(event_shape)
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
        self.solver = _as_solver(solver, SolverConfig())
        self.eval_solver = _as_solver(eval_solver, default_eval_solver)
        self.options: dict[str, Any] = {
            "divergence": divergence, "probe": probe, "eval_divergence": eval_divergence,
            "kinetic": kinetic, "jacobian": jacobian,
        }

    def config(self) -> dict[str, Any]:
        return {
            **self.options,
            "solver": self.solver.to_dict(),
            "eval_solver": self.eval_solver.to_dict(),
        }

    # -- one pass ---------------------------------------------------------------------------
    def _run(
        self,
        x: torch.Tensor,
        reverse: bool,
        solver: SolverConfig | None,
        divergence: str | None,
        regularize: bool = False,
        generator: torch.Generator | None = None,
        density: bool = True,
    ) -> FlowResult:
        """Data -> noise (or noise -> data with ``reverse``) through all blocks, with the train
        or eval-mode defaults for what is not given."""
        solver = solver or (self.solver if self.training else self.eval_solver)
        divergence = divergence or (
            self.options["divergence"] if self.training else self.options["eval_divergence"]
        )
        run = BlockPass(
            log_det=torch.zeros(x.shape[0], dtype=x.dtype, device=x.device),
            solver=solver, divergence=divergence, probe=self.options["probe"],
            kinetic=regularize and self.options["kinetic"] > 0,
            jacobian=regularize and self.options["jacobian"] > 0,
            generator=generator, density=density,
        )
        return run.result(self._through_blocks(run, x, reverse))

    def _through_blocks(self, run: BlockPass, x: torch.Tensor, reverse: bool) -> torch.Tensor:
        """``x`` through every block (``run.solve(block, h, reverse)``) and whatever lies
        between them, in order or in reverse; the subclass's architecture."""
        raise NotImplementedError

    # -- the maps ---------------------------------------------------------------------------
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
        result = self._run(z, reverse=True, solver=solver, divergence=None, density=False)
        return result.z, result.stats

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

        In eval mode the defaults are ``eval_solver`` and ``eval_divergence``; in train mode
        the training ones. ``generator`` seeds Hutchinson probes.
        """
        return self.log_prob_with_stats(
            x, solver=solver, divergence=divergence, generator=generator
        )[0]

    def log_prob_with_stats(self, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, list]:
        """``log_prob`` and the :class:`SolveStats` of each block's solve."""
        result = self.to_noise(x, **kwargs)
        return standard_normal_log_prob(result.z) + result.log_det, result.stats

    # -- training ---------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor) -> LossOutput:
        """Maximum likelihood: mean NLL (nats) plus the weighted RNODE regularizers."""
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
