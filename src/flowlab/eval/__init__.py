"""Evaluation: NLL in nats with standard errors, NFE and time accounting."""

from flowlab.eval.nll import TEST_SEED, NLLResult, evaluate_nll, heldout_points, mean_and_se

__all__ = ["TEST_SEED", "NLLResult", "evaluate_nll", "mean_and_se", "heldout_points"]
