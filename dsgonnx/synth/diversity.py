"""How diverse a synthetic batch is, measured on the model's own BN statistics.

The DSG papers' claim is that plain BN matching makes every sample match the same
statistics, so samples become alike. Two figures make that visible:

- ``sample_similarity``: for each BN layer, the cosine similarity between two samples'
  statistic vectors ``[μ̃ ; σ̃]`` (per-channel means and stds of the layer input), averaged
  over all pairs of distinct samples and then over layers. Lower = more diverse.
- ``stat_spread``: how far per-sample statistics scatter around the BN targets: per layer,
  the per-channel std across samples of μ̃ and of σ̃, divided by the BN std σ, averaged
  over channels, both terms and layers. 0 = every sample has the same statistics.
- ``stat_offset``: how far the batch's average statistics sit from the targets, in units
  of σ (RMS over channels of (mean_j μ̃ − μ)/σ and (mean_j σ̃ − σ)/σ, averaged).
"""

from __future__ import annotations

import torch


def diversity_metrics(stats: list[tuple[torch.Tensor, torch.Tensor]], targets: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """``stats``: per layer (mean, std) of shape (N, C); ``targets``: per layer (μ, σ) (C,)."""
    similarities, spreads, offsets = [], [], []
    for (mean, std), (target_mean, target_std) in zip(stats, targets):
        n = mean.shape[0]
        known = torch.isfinite(target_std)  # a layer with its mean only: scaled by the batch's std
        target_std = torch.where(known, target_std, std.mean(dim=0))
        scale = target_std.clamp_min(1e-6)
        if n > 1:
            vectors = torch.cat([mean, std], dim=1)
            unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cosine = unit @ unit.T
            similarities.append(((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item())
            spreads.append(0.5 * ((mean.std(dim=0) / scale).mean() + (std.std(dim=0) / scale).mean()).item())
        offset_mean = ((mean.mean(dim=0) - target_mean) / scale).pow(2).mean().sqrt()
        offset_std = ((std.mean(dim=0) - target_std) / scale).pow(2).mean().sqrt()
        offsets.append(0.5 * (offset_mean + offset_std).item())

    def avg(values):
        return round(sum(values) / len(values), 6) if values else None

    return {"sample_similarity": avg(similarities), "stat_spread": avg(spreads), "stat_offset": avg(offsets)}
