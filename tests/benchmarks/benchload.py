"""Load a module of ``benchmarks/`` (not an installed package) from its file, for the tests."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(relative: str, name: str) -> ModuleType:
    """``benchmarks/<relative>`` as module ``name`` (registered in ``sys.modules``, so that
    dataclasses and pickling inside it work)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
