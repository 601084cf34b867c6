"""Slack margins δ (means) and γ (stds) of Slack Distribution Alignment.

The papers define them as "the ε-percentile (ε = 0.9) of the gap between the BN statistics
and the statistics of Gaussian-initialised inputs", measured before optimisation; the
authors' margin files (``m.npy``/``n.npy``) were never released. That sentence has several
readings, all implemented here and chosen with ``--slack-reading``:

=================  ===============================================  ==================
reading            gap measured on                                   margin per layer
=================  ===============================================  ==================
layer-upper        batch statistics (over N, H, W) per channel       ε-quantile over channels (scalar)
layer-lower        same                                              (1−ε)-quantile over channels
sample-upper       per-sample statistics (over H, W), N×C gaps       ε-quantile over all N×C (scalar)
sample-lower       same                                              (1−ε)-quantile
channel-upper      per-sample statistics, N×C gaps                   ε-quantile over samples (one per channel)
channel-lower      same                                              (1−ε)-quantile over samples
=================  ===============================================  ==================

"upper" readings leave most of the Gaussian batch inside the margins at the start; "lower"
readings leave only the closest (1−ε) share inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SlackReading
from .losses import per_sample_stats

READINGS = SlackReading.values()


@dataclass(frozen=True)
class Margins:
    mean: torch.Tensor  # scalar or (C,)
    std: torch.Tensor


def _quantile(values: torch.Tensor, q: float, dim=None) -> torch.Tensor:
    return torch.quantile(values.float(), q) if dim is None else torch.quantile(values.float(), q, dim=dim)


def slack_margins(
    bn_input: torch.Tensor,
    target_mean: torch.Tensor,
    target_std: torch.Tensor,
    epsilon: float,
    reading: str,
) -> Margins:
    """Margins for one BN layer from its input ``(N, C, H, W)`` on the Gaussian batch."""
    if reading not in READINGS:
        raise ValueError(f"unknown slack reading {reading!r}; choose from {', '.join(READINGS)}")
    granularity, side = reading.split("-")
    q = epsilon if side == "upper" else 1.0 - epsilon
    if granularity == "layer":
        flat = bn_input.float().transpose(0, 1).flatten(1)  # C × (N·H·W)
        var, mean = torch.var_mean(flat, dim=1)
        std = torch.sqrt(var + 1e-6)
        return Margins(_quantile((mean - target_mean).abs(), q), _quantile((std - target_std).abs(), q))
    mean, std = per_sample_stats(bn_input)
    mean_gap, std_gap = (mean - target_mean).abs(), (std - target_std).abs()
    if granularity == "sample":
        return Margins(_quantile(mean_gap.flatten(), q), _quantile(std_gap.flatten(), q))
    return Margins(_quantile(mean_gap, q, dim=0), _quantile(std_gap, q, dim=0))
