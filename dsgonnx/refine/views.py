"""New views of a fixed set of images, for learning from it without fitting it: QAT draws
them each step, reconstruction adds them to its calibration set (``RefineConfig.views``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(images: torch.Tensor, generator: torch.Generator, shift: float = 0.125) -> torch.Tensor:
    """A new view of each image: flipped left-right with probability ½ and shifted by up to
    ``shift`` of its size in each direction (edges replicated), drawn from ``generator``."""
    n, _, h, w = images.shape
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flips.to(images.device)[:, None, None, None], images.flip(3), images)
    dy = int(round(h * shift))
    dx = int(round(w * shift))
    if dy == 0 and dx == 0:
        return out
    padded = F.pad(out, (dx, dx, dy, dy), mode="replicate")
    oy = torch.randint(0, 2 * dy + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * dx + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h)[None, :]).to(images.device)  # n × h
    cols = (ox[:, None] + torch.arange(w)[None, :]).to(images.device)  # n × w
    index = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(out.shape[1], device=images.device)[None, :, None, None]
    return padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]


def mix(images: torch.Tensor, generator: torch.Generator, how: str) -> torch.Tensor:
    """Each image blended, with probability ½, with another image of the batch (a random
    pairing; an image paired with itself stays as it is): ``mixup`` takes λ·image + (1 − λ)·other, ``cutmix`` pastes a box of the other
    covering a fraction λ of the image (its sides √λ of the image's, placed at random); λ
    uniform in [0, 1] per image. ``none`` (or a batch of one) returns ``images``. Drawn from
    ``generator``, so every rank of a data-parallel run blends alike."""
    n, _, h, w = images.shape
    if how == "none" or n < 2:
        return images
    partner = torch.randperm(n, generator=generator)
    chosen = torch.rand(n, generator=generator) < 0.5
    lam = torch.rand(n, generator=generator)
    other = images[partner.to(images.device)]
    if how == "mixup":
        weight = lam.to(images.device, images.dtype)[:, None, None, None]
        blended = weight * images + (1 - weight) * other
    elif how == "cutmix":
        side = lam.sqrt()
        box_h, box_w = (side * h).round().long(), (side * w).round().long()
        top = (torch.rand(n, generator=generator) * (h - box_h + 1)).floor().long()
        left = (torch.rand(n, generator=generator) * (w - box_w + 1)).floor().long()
        rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
        in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # n × h
        in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # n × w
        box = (in_rows[:, :, None] & in_cols[:, None, :]).to(images.device)
        blended = torch.where(box[:, None], other, images)
    else:
        raise ValueError(f"unknown mix {how!r}")
    return torch.where(chosen.to(images.device)[:, None, None, None], blended, images)


def with_views(images: torch.Tensor, views: int, seed: int) -> torch.Tensor:
    """``images`` followed by ``views`` − 1 new views of each (:func:`augment`), drawn from ``seed``."""
    if views <= 1:
        return images
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([images, *(augment(images, generator) for _ in range(views - 1))])
