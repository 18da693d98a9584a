"""An image data set as a training task: preprocessed batches for the training loop, fixed
validation points, the test split, and the bookkeeping that turns a model's log-density into
bits per dimension.

Pixels go through :class:`~flowlab.data.preprocess.Preprocess` (uniform dequantization, then
the logit transform unless ``alpha`` is None); the model sees the result either as images
``(C, H, W)`` (``layout="image"``: multiscale RealNVP and Glow) or flattened to ``(C*H*W,)``
(``layout="flat"``: every other model). The validation images are carved out of the training
split (a fixed choice, see :func:`~flowlab.data.images.split_validation`); the test split is
read only by evaluation.

With ``dequantization="variational"`` the dequantization noise is the model's own (a learned
``q(u|x)``, :class:`~flowlab.models.dequantization.VariationalDequantization`, which also does
the scaling and the logit): the task then hands the model the raw pixel values as floats, of
the same layout, with a log-Jacobian of 0, and reads the model's samples as dequantized pixels
in pixel units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowlab.data.images import IMAGE_DATASETS, ImageData, image_dataset, split_validation
from flowlab.data.preprocess import Preprocess
from flowlab.errors import ConfigError

LAYOUTS = ("flat", "image")
DEQUANTIZATIONS = ("uniform", "variational")
IMAGE_LAYOUT_MODELS = ("realnvp", "glow", "ffjord-multiscale")  # multiscale image models
VALIDATION_SEED = 0
VALIDATION_NOISE_SEED = 30_000  # dequantization noise of the fixed validation points


def default_layout(model: str) -> str:
    return "image" if model in IMAGE_LAYOUT_MODELS else "flat"


@dataclass
class ImageTask:
    """An image data set prepared for training and evaluation.

    Attributes:
        name: one of :data:`~flowlab.data.images.IMAGE_DATASETS`.
        folder: where its files are (None for ``digits``, which ships with scikit-learn).
        alpha: the logit transform's margin (None: the model works on ``[0, 1)^D``).
        layout: ``"image"`` or ``"flat"`` (see the module docstring).
        val_count: training images set aside for validation (default: 10%, at most 5,000).
        dequantization: ``uniform`` (noise drawn here) or ``variational`` (the model's own; the
            task hands raw pixels, see the module docstring).
    """

    name: str
    folder: str | None = None
    alpha: float | None = 0.05
    layout: str = "flat"
    val_count: int | None = None
    dequantization: str = "uniform"
    train: ImageData = field(init=False, repr=False)
    valid: ImageData = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.name not in IMAGE_DATASETS:
            raise ConfigError(f"unknown image dataset {self.name!r}; choose one of "
                              f"{', '.join(IMAGE_DATASETS)}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {LAYOUTS}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise ConfigError(f"unknown dequantization {self.dequantization!r}; choose one of "
                              f"{DEQUANTIZATIONS}")
        full = image_dataset(self.name, self.folder, "train")
        if self.val_count is None:
            self.val_count = min(5000, max(1, round(0.1 * len(full))))
        self.train, self.valid = split_validation(full, count=self.val_count,
                                                  seed=VALIDATION_SEED)
        self.preprocess = Preprocess(full.levels, self.alpha)

    # -- shapes ------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def dim(self) -> int:
        """``D``, the number of pixel values per image."""
        return math.prod(self.image_shape)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return self.image_shape if self.layout == "image" else (self.dim,)

    @property
    def levels(self) -> int:
        return self.train.levels

    # -- data for the model ----------------------------------------------------------------------
    def to_model(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer pixels ``(N, C, H, W)`` -> ``(y, ldj)``: model-space points of
        :attr:`event_shape` and the log-Jacobian of the preprocessing (see
        :mod:`flowlab.data.preprocess`). Under variational dequantization: the pixel values
        themselves (``dtype``), and ``ldj = 0``; ``generator`` is not used."""
        if self.dequantization == "variational":
            ldj = torch.zeros(pixels.shape[0], dtype=dtype, device=pixels.device)
            return pixels.to(dtype).reshape(pixels.shape[0], *self.event_shape), ldj
        y, ldj = self.preprocess(pixels, generator, dtype=dtype)
        return y.reshape(pixels.shape[0], *self.event_shape), ldj

    def to_pixels(self, y: torch.Tensor) -> torch.Tensor:
        """Model-space points (e.g. samples) -> ``(N, C, H, W)`` integer pixels (under
        variational dequantization the model's samples are in pixel units: their cells)."""
        y = y.reshape(y.shape[0], *self.image_shape)
        if self.dequantization == "variational":
            pixels = torch.floor(y).clamp(0, self.levels - 1)
            return pixels.to(torch.uint8 if self.levels <= 256 else torch.int64)
        return self.preprocess.to_pixels(y)

    def sampler(self) -> Callable[[int, torch.Generator], torch.Tensor]:
        """Training batches: images drawn with replacement, freshly dequantized (raw pixels
        under variational dequantization)."""

        def sample(n: int, generator: torch.Generator) -> torch.Tensor:
            return self.to_model(self.train.sample(n, generator), generator)[0]

        return sample

    def validation_points(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` validation images (all by default) with fixed dequantization noise
        (raw pixels under variational dequantization)."""
        images = self.valid.images if n is None else self.valid.images[:n]
        generator = torch.Generator().manual_seed(VALIDATION_NOISE_SEED)
        return self.to_model(images, generator)[0]

    def test_split(self) -> ImageData:
        return image_dataset(self.name, self.folder, "test")

    # -- run folders -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        config = {"name": self.name, "folder": self.folder, "alpha": self.alpha,
                  "layout": self.layout, "val_count": self.val_count}
        if self.dequantization != "uniform":  # (stored only when used: older configs stay equal)
            config["dequantization"] = self.dequantization
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageTask:
        folder = config.get("folder")
        return cls(config["name"], None if folder is None else str(Path(folder)),
                   config.get("alpha"), config.get("layout", "flat"), config.get("val_count"),
                   config.get("dequantization", "uniform"))

    def describe(self) -> str:
        c, h, w = self.image_shape
        return (f"{self.name} ({len(self.train):,} training and {len(self.valid):,} validation "
                f"images of {c}x{h}x{w}, {self.levels} levels, "
                f"{'no logit' if self.alpha is None else f'logit alpha {self.alpha:g}'}, "
                f"{self.dequantization} dequantization, {self.layout} layout)")
