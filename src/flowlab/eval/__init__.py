"""Evaluation: NLL in nats with standard errors, sample quality, NFE and time accounting."""

from flowlab.eval.bpd import BPDResult, evaluate_bits_per_dim
from flowlab.eval.nll import TEST_SEED, NLLResult, evaluate_nll, heldout_points, mean_and_se
from flowlab.eval.samples import (
    REFERENCE_SEED,
    SampleQuality,
    mmd2,
    sample_quality,
    sampling_sweep,
)

__all__ = [
    "BPDResult", "evaluate_bits_per_dim",
    "TEST_SEED", "NLLResult", "evaluate_nll", "mean_and_se", "heldout_points",
    "REFERENCE_SEED", "SampleQuality", "mmd2", "sample_quality", "sampling_sweep",
]
