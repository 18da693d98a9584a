"""Datasets: the 2-D toy densities of the FFJORD experiments, with exact densities and entropies."""

from flowlab.data.toy import DATASETS, ToyDensity, get_dataset

__all__ = ["DATASETS", "ToyDensity", "get_dataset"]
