"""Loss maths of synthesis against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsgonnx.synth import losses
from dsgonnx.synth.margins import READINGS, slack_margins


def test_per_sample_stats_match_torch():
    x = torch.randn(4, 3, 5, 6) * 3 + 2
    mean, std = losses.per_sample_stats(x, eps=0.0)
    torch.testing.assert_close(mean, x.mean(dim=(2, 3)))
    torch.testing.assert_close(std, x.flatten(2).std(dim=2), atol=1e-5, rtol=1e-5)


def test_zeroq_alignment_is_squared_distance():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    std = torch.tensor([[1.0, 1.0], [2.0, 3.0]])
    loss = losses.bn_alignment(mean, std, torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]))
    # sample 0: (1² + 1²) + (0 + 0) = 2; sample 1: (0 + 1²) + (1² + 2²) = 6
    torch.testing.assert_close(loss, torch.tensor([2.0, 6.0]))


def test_slack_alignment_is_zero_inside_margins_and_quadratic_outside():
    target_mean, target_std = torch.tensor([0.0]), torch.tensor([1.0])
    margin_mean, margin_std = torch.tensor(0.5), torch.tensor(0.25)
    gaps = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.5])
    mean = gaps.view(-1, 1)
    std = torch.ones(5, 1)
    loss = losses.bn_alignment(mean, std, target_mean, target_std, margin_mean, margin_std)
    expected = torch.clamp(gaps - 0.5, min=0) ** 2  # 0, 0, 0, 0.04, 1.0
    torch.testing.assert_close(loss, expected)
    # the std side: |σ̃ − σ| = 0.75 → (0.75 − 0.25)² = 0.25, symmetric in sign
    for sigma in (1.75, 0.25):
        loss = losses.bn_alignment(torch.zeros(1, 1), torch.tensor([[sigma]]), target_mean, target_std,
                                   margin_mean, margin_std)
        torch.testing.assert_close(loss, torch.tensor([0.25]))
    # per-channel margins broadcast over samples
    loss = losses.bn_alignment(torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), torch.zeros(2), torch.ones(2),
                               torch.tensor([0.5, 2.0]), torch.zeros(2))
    torch.testing.assert_close(loss, torch.tensor([0.25]))


def test_lse_weights_are_rows_of_identity_plus_ones():
    weights = losses.lse_weights(5, 3)
    expected = torch.ones(5, 3)
    for j in range(5):
        expected[j, j % 3] = 2.0
    torch.testing.assert_close(weights, expected)
    # a group of N = L samples: 1ᵀ(I + 11ᵀ) column sums are L + 1 per layer
    torch.testing.assert_close(losses.lse_weights(3, 3).sum(0), torch.full((3,), 4.0))
    # numbering continues across batches, and no enhancement means plain ones
    torch.testing.assert_close(losses.lse_weights(2, 3, first_sample=4)[0], torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(losses.lse_weights(4, 3, enhance=False), torch.ones(4, 3))


def test_combine_layers_applies_weights_and_averages_over_samples():
    layer_losses = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    weights = losses.lse_weights(2, 2)
    # sample 0: 2·1 + 2 = 4; sample 1: 3 + 2·4 = 11; mean = 7.5
    assert losses.combine_layers(layer_losses, weights).item() == pytest.approx(7.5)


def test_input_prior():
    images = torch.zeros(2, 3, 4, 4)
    images[1] = torch.tensor([-1.0, 1.0]).repeat(8).view(4, 4)  # mean 0, std ≈ 1.033
    prior = losses.input_prior(images)
    assert prior[0].item() == pytest.approx(3 * (1e-3 - 1) ** 2, rel=1e-5)  # std sqrt(0 + eps) → (σ − 1)² per channel
    sample_std = float(torch.tensor([-1.0, 1.0]).repeat(8).std())
    assert prior[1].item() == pytest.approx(3 * (sample_std - 1) ** 2, rel=1e-3)


def test_sci_is_finite_and_lower_for_decorrelated_batches():
    torch.manual_seed(0)
    reference = torch.randn(8, 3, 8, 8)
    base = torch.randn(1, 3, 8, 8)
    alike = base + 0.05 * torch.randn(8, 3, 8, 8)
    distinct = torch.randn(8, 3, 8, 8)
    high = losses.sample_correlation_inhibition(alike, reference)
    low = losses.sample_correlation_inhibition(distinct, reference)
    assert torch.isfinite(high) and torch.isfinite(low)
    assert low < high / 10
    # differentiable, and the gradient decorrelates: one step lowers the loss
    x = alike.clone().requires_grad_(True)
    losses.sample_correlation_inhibition(x, reference).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = alike - 0.5 * x.grad / x.grad.abs().max()
    assert losses.sample_correlation_inhibition(stepped, reference) < high


def test_margins_follow_each_reading():
    torch.manual_seed(1)
    x = torch.randn(6, 4, 5, 5) * torch.tensor([1.0, 2.0, 0.5, 1.5]).view(1, 4, 1, 1)
    target_mean, target_std = torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([1.0, 1.5, 1.0, 2.0])
    flat = x.transpose(0, 1).reshape(4, -1).double()
    batch_mean_gap = (flat.mean(1) - target_mean.double()).abs()
    batch_std_gap = (torch.sqrt(flat.var(1) + 1e-6) - target_std.double()).abs()
    sample_mean, sample_std = losses.per_sample_stats(x)
    sample_mean_gap, sample_std_gap = (sample_mean - target_mean).abs(), (sample_std - target_std).abs()
    expected = {
        "layer-upper": (np.quantile(batch_mean_gap, 0.9), np.quantile(batch_std_gap, 0.9)),
        "layer-lower": (np.quantile(batch_mean_gap, 0.1), np.quantile(batch_std_gap, 0.1)),
        "sample-upper": (np.quantile(sample_mean_gap.flatten(), 0.9), np.quantile(sample_std_gap.flatten(), 0.9)),
        "sample-lower": (np.quantile(sample_mean_gap.flatten(), 0.1), np.quantile(sample_std_gap.flatten(), 0.1)),
        "channel-upper": (np.quantile(sample_mean_gap, 0.9, axis=0), np.quantile(sample_std_gap, 0.9, axis=0)),
        "channel-lower": (np.quantile(sample_mean_gap, 0.1, axis=0), np.quantile(sample_std_gap, 0.1, axis=0)),
    }
    assert set(expected) == set(READINGS)
    for reading, (mean_margin, std_margin) in expected.items():
        margins = slack_margins(x, target_mean, target_std, 0.9, reading)
        np.testing.assert_allclose(margins.mean.numpy(), mean_margin, rtol=1e-4, atol=1e-6, err_msg=reading)
        np.testing.assert_allclose(margins.std.numpy(), std_margin, rtol=1e-4, atol=1e-6, err_msg=reading)
    # upper readings leave most of the Gaussian batch inside: lower margins are smaller
    assert slack_margins(x, target_mean, target_std, 0.9, "layer-lower").mean < \
        slack_margins(x, target_mean, target_std, 0.9, "layer-upper").mean


def test_per_sample_stats_gradient_matches_autograd():
    """The hand-written backward of the statistics equals autograd's on the plain formula."""
    torch.manual_seed(0)
    base = torch.randn(3, 4, 6, 5) * 2 + 1
    weights_mean, weights_std = torch.randn(3, 4), torch.randn(3, 4)

    def loss(mean, std):
        return (mean * weights_mean).sum() + (std * weights_std).sum()

    x = base.clone().requires_grad_(True)
    loss(*losses.per_sample_stats(x)).backward()
    y = base.clone().requires_grad_(True)
    flat = y.flatten(2)
    reference_std = torch.sqrt(flat.var(dim=2) + 1e-6)
    loss(flat.mean(dim=2), reference_std).backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-5, rtol=1e-4)
    # channels-last input (the CPU synthesis layout) gives the same gradient
    z = base.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    loss(*losses.per_sample_stats(z)).backward()
    torch.testing.assert_close(z.grad, y.grad, atol=1e-5, rtol=1e-4)


def test_pooled_stats_are_the_whole_batchs():
    x = torch.randn(6, 4, 9, 9) * torch.linspace(0.5, 3, 4).reshape(1, 4, 1, 1) + torch.randn(6, 4, 1, 1)
    mean, std = losses.pooled_stats(*losses.per_sample_stats(x))
    flat = x.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(mean[0], flat.mean(1))
    torch.testing.assert_close(std[0], flat.std(1), rtol=2e-2, atol=1e-4)  # per-sample unbiasing left in
