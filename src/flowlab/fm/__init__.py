"""Flow matching: probability paths, couplings of data and noise, the regression loss."""

from flowlab.fm.coupling import COUPLINGS, independent_coupling, make_coupling, ot_coupling
from flowlab.fm.paths import PATHS, LinearPath, VPPath, make_path
from flowlab.fm.targets import TARGETS, averaged_target, averaged_velocity, check_target

__all__ = [
    "COUPLINGS",
    "PATHS",
    "TARGETS",
    "LinearPath",
    "VPPath",
    "averaged_target",
    "averaged_velocity",
    "check_target",
    "independent_coupling",
    "make_coupling",
    "make_path",
    "ot_coupling",
]
