"""Grids of images (samples, test digits) written as PNG files."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_image_grid(pixels: torch.Tensor, path: str | os.PathLike, levels: int,
                    columns: int | None = None, scale: int = 4) -> Path:
    """Tile ``(N, C, H, W)`` integer pixels (``0..levels-1``) into one PNG.

    One or three channels (grey or RGB); intensities are stretched to 0..255 and each pixel
    is drawn as a ``scale`` x ``scale`` block, with a one-pixel gap between images.
    """
    n, c, h, w = pixels.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    values = pixels.to(torch.float64).clamp(0, levels - 1) * (255.0 / (levels - 1))
    values = values.round().to(torch.uint8).cpu().numpy()
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h,
               1 + k * (w + 1):1 + k * (w + 1) + w] = values[i].transpose(1, 2, 0)
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    image.save(path)
    return path
