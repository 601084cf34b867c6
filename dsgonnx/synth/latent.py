"""Images as a generator's output: Genie's parameterisation of synthesis (``generator``).

Genie (Jeon et al., CVPR 2023) distils calibration images not pixel by pixel but as
``G(z)``: a freshly initialised generator per batch and one latent vector per image, both
learned by the same BN-statistics loss the pixels would be. The convolutions of the generator
tie neighbouring pixels (and, through its shared weights, the images of a batch) together,
which the authors credit for images that reconstruct better. Their generator: a linear map of
a 256-wide latent to a 128-channel map at a quarter of the input size, then twice ×2 upsampling
with a 3×3 convolution (128 → 64 → image channels), BatchNorm and LeakyReLU between, ``tanh``
and an affine-free BatchNorm at the end (each output channel standardised over the batch,
as the model's normalised inputs are). Adam at 0.01 on the generator, decayed ×0.95 every
100 steps; the latents at the synthesis ``lr`` with its plateau schedule (``generator.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LATENT = 256
WIDTHS = (128, 64)
GENERATOR_LR = 0.01
DECAY, DECAY_EVERY = 0.95, 100
GENERATOR_BATCH = 128  # images per generator by default (Genie's batch)


def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """torch's default initialisation of every Conv/Linear (and N(0, 1) embeddings), drawn
    from ``generator`` (the global random state is the user's: a library does not reseed it)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.weight[0].numel())
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
            elif isinstance(layer, nn.Embedding):
                nn.init.normal_(layer.weight, generator=generator)


class LatentGenerator(nn.Module):
    """Images ``(N, C, H, W)`` from latent vectors ``(N, LATENT)`` (Genie-D's generator; any
    input size: the first map is ⌈H/4⌉ × ⌈W/4⌉, resized bilinearly at the end where ×4 misses)."""

    def __init__(self, chw: tuple[int, int, int], generator: torch.Generator, latent: int = LATENT,
                 widths: tuple[int, int] = WIDTHS):
        super().__init__()
        channels, height, width = chw
        self.chw, self.latent, self.width = chw, latent, widths[0]
        self.start = (max(1, math.ceil(height / 4)), max(1, math.ceil(width / 4)))
        self.project = nn.Linear(latent, widths[0] * self.start[0] * self.start[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(widths[0]),
            nn.Upsample(scale_factor=2), nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.BatchNorm2d(widths[1]),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2), nn.Conv2d(widths[1], channels, 3, padding=1), nn.Tanh(),
        )
        self.finish = nn.BatchNorm2d(channels, affine=False)
        init_parameters(self, generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.body(self.project(z).reshape(len(z), self.width, *self.start))
        if x.shape[2:] != self.chw[1:]:
            x = F.interpolate(x, size=self.chw[1:], mode="bilinear", align_corners=False)
        return self.finish(x)
