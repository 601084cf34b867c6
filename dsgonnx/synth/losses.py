"""The synthesis losses as pure functions of tensors (no hooks, no model).

Shapes: per-sample statistics are ``(N, C)`` (sample, channel) for one BN layer; targets
``(C,)``. Every layer loss returns a per-sample vector ``(N,)`` so that Layerwise Sample
Enhancement can weight samples differently; callers reduce it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class _SpatialMoments(torch.autograd.Function):
    """E[x] and E[x²] over the spatial dims, with a hand-written backward.

    Autograd's version of ``x.mean(d)``, ``(x * x).mean(d)`` allocates ``x * x`` and three
    full-size gradient tensors per BN layer; here the forward needs no temporary (the
    squared mean is a norm) and the backward is one fused ``g₁/n + 2·x·g₂/n``. This is the
    hot path of synthesis (it runs on every BN input, every iteration).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]):
        count = math.prod(x.shape[d] for d in dims)
        mean = x.mean(dim=dims)
        mean_sq = torch.linalg.vector_norm(x, ord=2, dim=dims).square() / count
        ctx.save_for_backward(x)
        ctx.dims, ctx.count = dims, count
        return mean, mean_sq

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, grad_mean_sq: torch.Tensor):
        (x,) = ctx.saved_tensors
        shape = list(grad_mean.shape) + [1] * len(ctx.dims)
        base = (grad_mean / ctx.count).reshape(shape)
        scale = (grad_mean_sq * (2.0 / ctx.count)).reshape(shape)
        return torch.addcmul(base, x, scale), None


def per_sample_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over the spatial dims of an ``(N, C, H, W)`` tensor.

    Std is ``sqrt(unbiased var + eps)``, as ZeroQ and the DSG code compute it, in float32
    whatever the forward pass ran in (from E[x] and E[x²], see :class:`_SpatialMoments`).
    """
    x = x.float()
    dims = tuple(range(2, x.dim()))
    count = math.prod(x.shape[2:]) if x.dim() > 2 else 1
    if x.requires_grad:
        mean, mean_sq = _SpatialMoments.apply(x, dims)
    else:
        mean, mean_sq = x.mean(dim=dims), torch.linalg.vector_norm(x, ord=2, dim=dims).square() / count
    var = (mean_sq - mean * mean).clamp_min(0.0) * (count / max(count - 1, 1))
    return mean, torch.sqrt(var + eps)


def pooled_stats(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's channel mean and std ``(1, C)`` from per-sample ones ``(N, C)`` (each sample's
    E[x²] taken as σ̃² + μ̃²: equal sample sizes, the per-sample unbiasing left in)."""
    pooled_mean = mean.mean(dim=0, keepdim=True)
    second = (std * std + mean * mean).mean(dim=0, keepdim=True)
    return pooled_mean, torch.sqrt((second - pooled_mean * pooled_mean).clamp_min(1e-12))


def bn_alignment(
    mean: torch.Tensor,
    std: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    mean_margin: Optional[torch.Tensor] = None,
    std_margin: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-sample BN alignment loss ``(N,)``.

    Without margins this is ZeroQ's ``‖μ̃−μ‖² + ‖σ̃−σ‖²``; with margins δ, γ it is DSG's
    Slack Distribution Alignment ``‖max(|μ̃−μ|−δ, 0)‖² + ‖max(|σ̃−σ|−γ, 0)‖²`` — zero inside
    the margins, quadratic outside. Margins broadcast: a scalar per layer or one per channel.
    A NaN target std (a layer whose variance the graph does not carry) drops the std term.
    ``scale`` ``(C,)``: the gaps (past the margins) are measured in these units, e.g. the
    running std, so that every layer's term is on one scale whatever its activations' size.
    """
    known = torch.isfinite(target_std)
    if not bool(known.all()):  # the sample's own std: no gap, and no NaN in the gradients
        target_std = torch.where(known, target_std, std.detach())
        std_margin = None if std_margin is None else torch.nan_to_num(std_margin, nan=0.0)
    mean_gap = (mean - target_mean).abs()
    std_gap = (std - target_std).abs()
    if mean_margin is not None:
        mean_gap = torch.clamp(mean_gap - mean_margin, min=0)
    if std_margin is not None:
        std_gap = torch.clamp(std_gap - std_margin, min=0)
    if scale is not None:
        mean_gap, std_gap = mean_gap / scale, std_gap / scale
    return (mean_gap**2).sum(dim=1) + (std_gap**2).sum(dim=1)


def lse_weights(num_samples: int, num_layers: int, enhance: bool = True, first_sample: int = 0) -> torch.Tensor:
    """Weights ``(N, L)`` of Layerwise Sample Enhancement.

    Sample ``j`` (numbered from ``first_sample`` across batches) counts every layer once
    and layer ``j mod L`` once more: the rows of ``(I + 11ᵀ)`` for a group of ``L``
    samples, repeated for further groups. Without enhancement every weight is 1.
    """
    weights = torch.ones(num_samples, num_layers)
    if enhance and num_layers:
        index = torch.arange(num_samples)
        weights[index, (index + first_sample) % num_layers] += 1.0
    return weights


def combine_layers(per_sample_layer_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(1/N) Σ_j Σ_i w_ji l_ji`` for losses and weights of shape ``(N, L)``."""
    return (per_sample_layer_losses * weights).sum() / per_sample_layer_losses.shape[0]


def input_prior(images: torch.Tensor) -> torch.Tensor:
    """ZeroQ's input-layer prior: per-sample channel means → 0 and stds → 1 ``(N,)``."""
    mean, std = per_sample_stats(images)
    return (mean**2).sum(dim=1) + ((std - 1.0) ** 2).sum(dim=1)


def _unit_rows(batch: torch.Tensor) -> torch.Tensor:
    flat = batch.float().flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def correlation_spectrum(batch: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending) of the ``N×N`` cosine-similarity kernel of a batch."""
    rows = _unit_rows(batch)
    return torch.linalg.eigvalsh(rows @ rows.T)


def sample_correlation_inhibition(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Sample Correlation Inhibition (TPAMI DSG): a DPP loss against Gaussian noise.

    The samples' L2-normalised features form an ``N×N`` similarity kernel, a
    determinantal point process whose spectrum is flat when samples are uncorrelated and
    has one dominant eigenvalue when they look alike. The loss is the mean squared
    difference between its eigenvalues and those of a Gaussian-noise reference batch
    (``torch.linalg.eigh``; GDPP's magnitude term). GDPP's eigenvector-alignment term is
    left out: the noise kernel's eigenvalues are nearly degenerate, where eigenvector
    gradients blow up (the authors' released code detaches both terms, so neither
    reached the images there).
    """
    if samples.shape[0] < 2:
        return samples.new_zeros(())
    fake = correlation_spectrum(samples)
    with torch.no_grad():
        real = correlation_spectrum(reference)
    return torch.mean((fake - real) ** 2)


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (smoothness prior)."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy
