"""One `odeint` call for every ODE in flowlab.

Numerics are delegated to torchdiffeq (Butcher tableaux, error control, the adjoint autograd
function). This module adds what flowlab needs around it:

* a :class:`SolverConfig` value that names the solver, tolerances, step size and gradient
  strategy, validated once with errors that say how to fix them;
* function-evaluation counts returned by the call that made them (:class:`SolveStats`), never
  read back from a counter stored on a module;
* solver failures (step-size underflow, too many steps) turned into :class:`SolverError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torchdiffeq

from flowlab.errors import ConfigError, NonFiniteError, SolverError

State = torch.Tensor | tuple[torch.Tensor, ...]
VectorField = Callable[[torch.Tensor, State], State]

ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "dopri8", "adaptive_heun")
FIXED_GRID_SOLVERS = ("euler", "midpoint", "rk4")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS
GRADIENTS = ("backprop", "adjoint")


@dataclass(frozen=True)
class SolverConfig:
    """How to solve an ODE and how to differentiate the solution.

    Attributes:
        solver: one of :data:`SOLVERS`. Adaptive solvers use ``atol``/``rtol``; fixed-grid
            solvers use ``step_size`` (or ``steps``, the number of equal steps over the interval).
        atol, rtol: absolute and relative error tolerances of adaptive solvers.
        step_size: step of fixed-grid solvers, in units of the ODE's time.
        steps: alternative to ``step_size``: this many equal steps between consecutive output
            times. Exactly one of ``step_size`` and ``steps`` is needed for a fixed-grid solver.
        gradient: ``"backprop"`` differentiates through the solver's operations (memory grows
            with the number of steps); ``"adjoint"`` solves the augmented adjoint ODE backwards
            in time (constant memory in the number of steps).
        adjoint_atol, adjoint_rtol: tolerances of the backward solve (default: forward ones).
        seminorm: with the adjoint, control the backward step size on the state and its
            adjoint only, not on the parameter-gradient channels (Kidger et al. 2021), which
            typically cuts the backward NFE.
        max_steps: adaptive solvers give up with :class:`SolverError` after this many steps.
    """

    solver: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: float | None = None
    steps: int | None = None
    gradient: str = "backprop"
    adjoint_atol: float | None = None
    adjoint_rtol: float | None = None
    seminorm: bool = False
    max_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(
                f"unknown ODE solver {self.solver!r}; choose one of {', '.join(SOLVERS)}"
            )
        if self.gradient not in GRADIENTS:
            raise ConfigError(
                f"unknown gradient strategy {self.gradient!r}; choose 'backprop' or 'adjoint'"
            )
        # Checked for every solver: a fixed-grid config may be switched to an adaptive one with
        # `replace`, and the adjoint ones would otherwise reach torchdiffeq unchecked (where a
        # 0 would also silently fall back to the forward tolerance).
        for name in ("atol", "rtol", "adjoint_atol", "adjoint_rtol"):
            value = getattr(self, name)
            if value is not None and not (value > 0):
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.solver not in ADAPTIVE_SOLVERS:
            if (self.step_size is None) == (self.steps is None):
                raise ConfigError(
                    f"fixed-grid solver {self.solver!r} needs exactly one of step_size and "
                    f"steps (got step_size={self.step_size}, steps={self.steps})"
                )
            if self.step_size is not None and not (self.step_size > 0):
                raise ConfigError(f"step_size must be positive, got {self.step_size}")
            if self.steps is not None and self.steps < 1:
                raise ConfigError(f"steps must be at least 1, got {self.steps}")
        if self.seminorm and self.gradient != "adjoint":
            raise ConfigError("seminorm only applies to gradient='adjoint'")
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")

    @property
    def adaptive(self) -> bool:
        return self.solver in ADAPTIVE_SOLVERS

    def replace(self, **changes) -> SolverConfig:
        return SolverConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """Short human-readable description, e.g. ``dopri5 (atol=1e-05, rtol=1e-05)``."""
        if self.adaptive:
            return f"{self.solver} (atol={self.atol:g}, rtol={self.rtol:g})"
        if self.steps is not None:
            return f"{self.solver} ({self.steps} steps)"
        return f"{self.solver} (step {self.step_size:g})"


@dataclass
class SolveStats:
    """Number of function evaluations (NFE) of one solve.

    ``nfe_forward`` is final when :func:`odeint` returns. ``nfe_backward`` counts the
    evaluations of the adjoint (backward-in-time) solve and is filled in when the solution is
    backpropagated; it stays 0 with ``gradient="backprop"``, whose backward pass replays the
    recorded graph without calling the vector field.
    """

    nfe_forward: int = 0
    nfe_backward: int = 0
    _in_backward: bool = field(default=False, repr=False)

    def __add__(self, other: SolveStats) -> SolveStats:
        return SolveStats(
            self.nfe_forward + other.nfe_forward, self.nfe_backward + other.nfe_backward
        )


class _CountedField(torch.nn.Module):
    """Wraps a vector field so that each evaluation is counted in the given stats object."""

    def __init__(self, func: VectorField, stats: SolveStats):
        super().__init__()
        self.func = func
        self.stats = stats

    def forward(self, t: torch.Tensor, y: State) -> State:
        if self.stats._in_backward:
            self.stats.nfe_backward += 1
        else:
            self.stats.nfe_forward += 1
        return self.func(t, y)


def _grid_options(config: SolverConfig, t: torch.Tensor) -> dict:
    if config.adaptive:
        return {"max_num_steps": config.max_steps}
    if config.step_size is not None:
        return {"step_size": float(config.step_size)}
    # `steps` equal steps between consecutive output times. torchdiffeq hands the constructor
    # the times it integrates over (negated when solving backward in time), so build from those.
    steps = config.steps

    def grid(func, y0, times: torch.Tensor) -> torch.Tensor:
        frac = torch.linspace(0.0, 1.0, steps + 1, device=times.device, dtype=times.dtype)[:-1]
        pieces = [times[i] + (times[i + 1] - times[i]) * frac for i in range(len(times) - 1)]
        return torch.cat(pieces + [times[-1:]])

    return {"grid_constructor": grid}


def _check_state(y0: State) -> None:
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    if not tensors:
        raise ConfigError("the initial state is an empty tuple")
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(
                f"the ODE state must be a tensor or a tuple of tensors, got {type(tensor)}"
            )
        if not torch.is_floating_point(tensor):
            raise ConfigError(f"the ODE state must be floating point, got {tensor.dtype}")


class _MarkBackward(torch.autograd.Function):
    """Identity whose backward flips the stats into "backward" mode before the adjoint runs.

    Placed on the solution, its backward executes before torchdiffeq's adjoint backward, so
    evaluations from then on are counted as backward NFE.
    """

    @staticmethod
    def forward(ctx, stats: SolveStats, *ys: torch.Tensor):
        ctx.stats = stats
        return tuple(y.clone() for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        ctx.stats._in_backward = True
        return (None, *grads)


def odeint(
    func: VectorField,
    y0: State,
    t: torch.Tensor | Sequence[float],
    config: SolverConfig | None = None,
    *,
    params: Iterable[torch.Tensor] | None = None,
) -> tuple[State, SolveStats]:
    """Solve dy/dt = func(t, y) from y(t[0]) = y0 and return y at every time in ``t``.

    Args:
        func: the vector field, called as ``func(t, y)`` with a scalar tensor ``t`` and a
            state of the same structure as ``y0``; it returns a state of that structure.
        y0: initial state, a tensor or a tuple of tensors (each of any shape).
        t: 1-D increasing or decreasing times; ``t[0]`` is the initial time. Solving backward
            in time only needs decreasing ``t``. If ``t`` requires grad, gradients with respect
            to the times are returned too (both gradient strategies).
        config: solver, tolerances and gradient strategy; default ``SolverConfig()``.
        params: with ``gradient="adjoint"``, the tensors whose gradients the adjoint computes.
            Default: ``func.parameters()`` when ``func`` is an ``nn.Module``. Gradients with
            respect to tensors that ``func`` uses but that are not listed are silently zero,
            which is why a non-module ``func`` must list them.

    Returns:
        ``(solution, stats)``: the solution with a leading time axis of length ``len(t)`` on
        every tensor, and the :class:`SolveStats` of this call.

    Raises:
        SolverError: the step size underflowed or ``max_steps`` was exceeded.
        NonFiniteError: the solution at the final time contains NaN or Inf.
        ConfigError: an invalid argument.
    """
    config = config or SolverConfig()
    _check_state(y0)
    first = y0[0] if isinstance(y0, tuple) else y0
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=first.dtype, device=first.device)
    if t.ndim != 1 or len(t) < 2:
        raise ConfigError(f"t must be 1-D with at least two times, got shape {tuple(t.shape)}")

    stats = SolveStats()
    tensors = y0 if isinstance(y0, tuple) else (y0,)
    if all(tensor.numel() == 0 for tensor in tensors):
        # Nothing to integrate (an empty batch). Adaptive solvers would take the norm of an
        # empty state, get NaN and report a misleading step-size underflow.
        ys = tuple(tensor.unsqueeze(0).expand(len(t), *tensor.shape).clone() for tensor in tensors)
        return (ys if isinstance(y0, tuple) else ys[0]), stats
    counted = _CountedField(func, stats)
    options = _grid_options(config, t)
    try:
        if config.gradient == "adjoint":
            if params is None:
                if not isinstance(func, torch.nn.Module):
                    raise ConfigError(
                        "gradient='adjoint' with a vector field that is not an nn.Module needs "
                        "params=... (the tensors to differentiate)"
                    )
                params = func.parameters()
            params = tuple(p for p in params if p.requires_grad)
            adjoint_options = {"norm": "seminorm"} if config.seminorm else {}
            if not config.adaptive:
                adjoint_options.update(options)
            else:
                adjoint_options["max_num_steps"] = config.max_steps
            ys = torchdiffeq.odeint_adjoint(
                counted,
                y0,
                t,
                rtol=config.rtol,
                atol=config.atol,
                method=config.solver,
                options=options,
                adjoint_rtol=config.adjoint_rtol or config.rtol,
                adjoint_atol=config.adjoint_atol or config.atol,
                adjoint_method=config.solver,
                adjoint_options=adjoint_options,
                adjoint_params=params,
            )
            if isinstance(ys, tuple):
                ys = _MarkBackward.apply(stats, *ys)
            else:
                (ys,) = _MarkBackward.apply(stats, ys)
        else:
            ys = torchdiffeq.odeint(
                counted, y0, t, rtol=config.rtol, atol=config.atol, method=config.solver,
                options=options,
            )
    except AssertionError as err:  # torchdiffeq signals underflow / max steps this way
        message = str(err)
        if "underflow" in message:
            raise SolverError(
                f"{config.describe()}: step size underflow after {stats.nfe_forward} function "
                "evaluations; the dynamics are too stiff or not finite. Loosen atol/rtol, "
                "lower the learning rate, or add the kinetic/jacobian regularizers."
            ) from err
        if "max_num_steps" in message:
            raise SolverError(
                f"{config.describe()}: more than max_steps={config.max_steps} steps "
                f"({stats.nfe_forward} function evaluations); raise max_steps or loosen "
                "atol/rtol, or regularize the dynamics."
            ) from err
        raise
    finals = ys if isinstance(ys, tuple) else (ys,)
    for index, tensor in enumerate(finals):
        if not torch.isfinite(tensor[-1]).all():
            bad = int((~torch.isfinite(tensor[-1])).sum())
            raise NonFiniteError(
                f"{config.describe()}: the solution has {bad} NaN/Inf entries in state "
                f"component {index} after {stats.nfe_forward} function evaluations; the "
                "initial state or the vector field is not finite"
            )
    return ys, stats
