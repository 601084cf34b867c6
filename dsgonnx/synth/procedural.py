"""Procedural natural-image priors: calibration images that need nothing from the model.

Dead leaves (Lee, Mumford & Huang, IJCV 2001; used as pre-training data by Baradad et al.,
"Learning to See by Looking at Noise", NeurIPS 2021): opaque shapes dropped one over the
other, their sizes drawn from a power law ``p(r) ∝ r⁻³``, the law under which the image
is scale-invariant. The result has what Gaussian noise lacks and every natural photo has:
flat regions bounded by sharp edges (occlusion), a power spectrum falling like ``1/f²``,
and colours that vary within a channel-correlated range. A faint ``1/f^α`` texture adds
the fine detail inside regions. Each image draws its own size range, contrast, colour
spread and texture strength, so a set spans a range of statistics rather than one.

Images are made as RGB pixels 0–255 and turned into model inputs by the model's
preprocessing recipe; without one, pixels are centred and scaled by fixed constants to
about mean 0, std 1 (the scale of the Gaussian images), the same for every image.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..preprocess import Preprocess

MIN_RADIUS_PX = 1.0  # the smallest leaf, in pixels at the model's resolution
PIXEL_CENTRE, PIXEL_SPREAD = 127.5, 75.0  # about the mean and std of dead-leaves pixels (0-255)


def _power_law_radii(rng: np.random.Generator, count: int, low: float, high: float) -> np.ndarray:
    """Radii with density ∝ r⁻³ on [low, high] (inverse-CDF sampling)."""
    u = rng.random(count)
    return 1.0 / np.sqrt(low**-2 - u * (low**-2 - high**-2))


def _pink_noise(rng: np.random.Generator, channels: int, height: int, width: int, alpha: float) -> np.ndarray:
    """Zero-mean, unit-std noise with power spectrum ∝ 1/f^alpha, ``(channels, H, W)``."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    amplitude = radius ** (-alpha / 2.0)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (rng.standard_normal((channels, *amplitude.shape))
                            + 1j * rng.standard_normal((channels, *amplitude.shape)))
    noise = np.fft.irfft2(spectrum, s=(height, width))
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    return noise / np.maximum(noise.std(axis=(1, 2), keepdims=True), 1e-12)


def dead_leaves(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    """One dead-leaves image, RGB pixels in [0, 1], ``(channels, H, W)``."""
    size = min(height, width)
    low = max(MIN_RADIUS_PX, size * rng.uniform(0.005, 0.03))
    high = size * rng.uniform(0.25, 0.6)
    spread = rng.uniform(0.03, 0.2)  # how far a leaf's channels stray from its brightness
    contrast = rng.uniform(0.5, 1.0)
    base = rng.uniform(0.2, 0.8)

    def colour() -> np.ndarray:
        value = base + contrast * (rng.random() - 0.5)
        return np.clip(value + spread * rng.standard_normal(channels), 0.0, 1.0)

    image = np.empty((channels, height, width), np.float32)
    image[:] = colour()[:, None, None]
    # enough leaves to cover the image about three times over (E[r²] of the power law)
    mean_area = np.pi * 2.0 * low**2 * np.log(high / low) / (1.0 - (low / high) ** 2)
    count = int(min(20000, 3.0 * height * width / mean_area))
    radii = _power_law_radii(rng, count, low, high)
    centres_y = rng.uniform(-0.1 * height, 1.1 * height, count)
    centres_x = rng.uniform(-0.1 * width, 1.1 * width, count)
    squares = rng.random(count) < 0.3  # some straight edges among the round ones
    ys, xs = np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32)
    for r, cy, cx, square in zip(radii, centres_y, centres_x, squares):
        top, bottom = max(0, int(cy - r)), min(height, int(np.ceil(cy + r)) + 1)
        left, right = max(0, int(cx - r)), min(width, int(np.ceil(cx + r)) + 1)
        if top >= bottom or left >= right:
            continue
        dy = ys[top:bottom, None] - cy
        dx = xs[None, left:right] - cx
        inside = np.maximum(np.abs(dy), np.abs(dx)) <= r if square else dy * dy + dx * dx <= r * r
        patch = image[:, top:bottom, left:right]
        patch[:, inside] = colour()[:, None]
    texture = rng.uniform(0.0, 0.04)
    if texture > 0:
        grain = _pink_noise(rng, 1, height, width, rng.uniform(1.0, 2.0))
        tint = _pink_noise(rng, channels, height, width, 2.0)
        image += texture * (grain + 0.3 * tint).astype(np.float32)
    return np.clip(_blur(image, rng.uniform(0.3, 1.2)), 0.0, 1.0)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels (through the FFT, wrapping at the borders): the
    optics and resampling every photo goes through soften its edges."""
    height, width = image.shape[1:]
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * gain, s=(height, width)).astype(np.float32)


def procedural_images(count: int, chw: tuple[int, int, int], seed: int = 0,
                      preprocess: Optional[Preprocess] = None, first: int = 0) -> np.ndarray:
    """``count`` dead-leaves images as model inputs, float32 ``(count, C, H, W)``.

    Image ``i`` depends on ``seed`` and ``first + i`` only, so a set made in parts (or
    over several processes) equals the set made at once.
    """
    channels, height, width = chw
    pixels = np.stack([
        dead_leaves(np.random.default_rng([seed, first + i]), channels, height, width) for i in range(count)
    ]) * np.float32(255.0)
    if preprocess is not None:
        return preprocess.normalise(pixels)
    return ((pixels - np.float32(PIXEL_CENTRE)) / np.float32(PIXEL_SPREAD)).astype(np.float32)
