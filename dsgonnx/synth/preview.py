"""A PNG grid of synthetic images, mapped back to pixels through the preprocessing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..artifacts import write_atomically
from ..preprocess import Preprocess


def to_pixels(images: np.ndarray, preprocess: Optional[Preprocess]) -> np.ndarray:
    """NCHW model-space images -> NHWC uint8 RGB pixels.

    With a recipe the inverse of its normalisation is applied (:meth:`Preprocess.denormalise`:
    BGR models are flipped back to RGB, grey models take the first channel's values);
    without one each image is min-max stretched, which shows structure but not true colours.
    """
    if preprocess is not None:
        pixels = preprocess.denormalise(images)
    else:
        low = images.min(axis=(1, 2, 3), keepdims=True)
        high = images.max(axis=(1, 2, 3), keepdims=True)
        pixels = (images - low) / np.maximum(high - low, 1e-12) * 255.0
    pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(pixels, 3, axis=3) if pixels.shape[3] == 1 else pixels[..., :3]


def save_grid(images: np.ndarray, path: str | Path, preprocess: Optional[Preprocess] = None,
              max_images: int = 64, cell: int = 96) -> Path:
    """Write up to ``max_images`` images as a square-ish grid PNG (atomically)."""
    from PIL import Image

    pixels = to_pixels(images[:max_images], preprocess)
    count = len(pixels)
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * (cell + 2), rows * (cell + 2)), (255, 255, 255))
    for index, image in enumerate(pixels):
        tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, ((index % columns) * (cell + 2), (index // columns) * (cell + 2)))
    path = Path(path)
    write_atomically(path, lambda handle: grid.save(handle, format="PNG"))
    return path
