"""Evaluation: NLL in nats with standard errors, sample quality, NFE and time accounting."""

from flowlab.eval.bpd import (
    BPDResult,
    estimator_standard_error,
    evaluate_bits_per_dim,
    score_is_stochastic,
)
from flowlab.eval.nll import TEST_SEED, NLLResult, evaluate_nll, heldout_points, mean_and_se
from flowlab.eval.samples import (
    REFERENCE_SEED,
    SampleQuality,
    mmd2,
    sample_quality,
    sampling_sweep,
)

__all__ = [
    "BPDResult", "estimator_standard_error", "evaluate_bits_per_dim", "score_is_stochastic",
    "TEST_SEED", "NLLResult", "evaluate_nll", "mean_and_se", "heldout_points",
    "REFERENCE_SEED", "SampleQuality", "mmd2", "sample_quality", "sampling_sweep",
]
