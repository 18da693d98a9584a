"""Datasets: the 2-D toy densities of the FFJORD experiments (exact densities and entropies),
image data sets read from their standard files (MNIST, Fashion-MNIST, CIFAR-10, scikit-learn's
8x8 digits), and image preprocessing with every Jacobian accounted for (bits per dimension)."""

from flowlab.data.images import (
    IMAGE_DATASETS,
    ImageData,
    image_dataset,
    load_cifar10,
    load_digits,
    load_mnist,
    read_idx,
    split_validation,
)
from flowlab.data.preprocess import (
    Preprocess,
    bits_per_dim,
    dequantize,
    logit_inverse,
    logit_transform,
)
from flowlab.data.toy import DATASETS, ToyDensity, get_dataset

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "ImageData",
    "Preprocess",
    "ToyDensity",
    "bits_per_dim",
    "dequantize",
    "get_dataset",
    "image_dataset",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "logit_inverse",
    "logit_transform",
    "read_idx",
    "split_validation",
]
