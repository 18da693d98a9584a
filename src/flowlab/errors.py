"""flowlab's own exception types: every user-facing failure is one of these."""


class FlowlabError(Exception):
    """Base class of every error flowlab raises on purpose; the message says what and how to fix."""


class ConfigError(FlowlabError, ValueError):
    """An option, argument or configuration value is invalid."""


class DataError(FlowlabError, ValueError):
    """Input data is malformed (wrong shape, NaN/Inf, unknown dataset, bad file)."""


class SolverError(FlowlabError, RuntimeError):
    """The ODE solver failed (step size underflow, too many steps, non-finite state)."""


class NonFiniteError(FlowlabError, FloatingPointError):
    """A loss, gradient or state became NaN or Inf; the message names where."""


class RunDirError(FlowlabError, OSError):
    """A run folder or checkpoint is missing, unreadable, corrupt or incompatible."""
