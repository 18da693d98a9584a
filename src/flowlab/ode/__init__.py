"""Initial value problems dz/dt = f(t, z): solvers, gradients by backprop or adjoint, NFE counts.

The public surface is one function, :func:`odeint`, plus the value types it takes and returns.
The solver, its tolerances, and the gradient strategy are separate arguments: swapping the
adjoint for direct backpropagation never touches a solver.
"""

from flowlab.ode.solve import (
    ADAPTIVE_SOLVERS,
    FIXED_GRID_SOLVERS,
    SOLVERS,
    SolverConfig,
    SolveStats,
    odeint,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_GRID_SOLVERS",
    "SOLVERS",
    "SolveStats",
    "SolverConfig",
    "odeint",
]
