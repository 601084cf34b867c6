"""The synthesis loop: Gaussian images optimised against the model's BN statistics.

One readable loop per batch: forward (BN inputs captured by hooks) → per-sample
statistics → layer losses (ZeroQ alignment or DSG slack alignment) → layer/sample
weights (LSE) → priors and SCI → Adam step → projection into the pixel box.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from ..artifacts import SyntheticSet
from ..errors import DataError, NoBatchNormError, SynthesisError
from ..graph.bn_taps import BNLayer, BNProbe, bn_folded, find_bn_layers
from ..graph.onnx_io import LoadedModel, load_model
from ..graph.to_torch import TorchModel, to_torch
from ..progress import Progress, say
from . import losses
from .config import SynthConfig
from .diversity import diversity_metrics
from .margins import Margins, slack_margins


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("--device cuda: no usable CUDA device (torch.cuda.is_available() is False)")
        return torch.device("cuda")
    return torch.device("cpu")


def pixel_box(config: SynthConfig, channels: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel bounds ``(1, C, 1, 1)`` of real images in the model's input space."""
    if config.preprocess is None:
        return None
    mean = torch.tensor(config.preprocess.mean, dtype=torch.float32)
    std = torch.tensor(config.preprocess.std, dtype=torch.float32)
    if mean.numel() != channels:
        if mean.numel() == 3 and channels == 1:  # grey model: one channel of the recipe
            mean, std = mean[:1], std[:1]
        else:
            raise DataError(f"preprocessing has {mean.numel()} channel values but the model takes {channels} channels")
    low, high = (0.0 - mean) / std, (config.preprocess.pixel_scale - mean) / std
    low, high = torch.minimum(low, high), torch.maximum(low, high)
    return low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)


class _StatsTap:
    """Collects per-sample statistics of every BN input during a forward pass."""

    def __init__(self, model: TorchModel, layers: list[BNLayer], keep_inputs: bool = False):
        self.stats: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(layers)
        self.inputs: list[Optional[torch.Tensor]] = [None] * len(layers)
        self._index = {layer.name: i for i, layer in enumerate(layers)}
        self._keep_inputs = keep_inputs
        self.probe = BNProbe(model, layers, self._record)

    def _record(self, layer: BNLayer, x: torch.Tensor) -> None:
        i = self._index[layer.name]
        self.stats[i] = losses.per_sample_stats(x)
        if self._keep_inputs:
            self.inputs[i] = x.detach().float()


def _targets(layers: list[BNLayer], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            torch.from_numpy(layer.running_mean).to(device),
            torch.sqrt(torch.from_numpy(layer.running_var).to(device) + layer.eps),
        )
        for layer in layers
    ]


def _batches(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def default_batch_size(config: SynthConfig, loaded: LoadedModel, num_layers: int) -> int:
    """All samples at once up to 50 M input values per batch (about 330 images of
    3×224², far more for 32² ones); a model with a fixed batch size gets that size."""
    per_image = int(np.prod(loaded.input.chw))
    cap = max(1, int(50_000_000 // per_image))
    size = min(config.num_samples, cap)
    if loaded.input.shape[0] is not None:
        size = loaded.input.shape[0]
    return size


def synthesize(
    model: str | LoadedModel | TorchModel,
    config: Optional[SynthConfig] = None,
    **overrides,
) -> SyntheticSet:
    """Synthesize calibration images for ``model`` (a path, loaded model or torch twin).

    Raises :class:`NoBatchNormError` for zeroq/dsg on a model without BN statistics.
    """
    config = replace(config or SynthConfig(), **overrides) if overrides else (config or SynthConfig())
    start = time.perf_counter()
    if isinstance(model, TorchModel):
        torch_model = model
    else:
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        torch_model = to_torch(loaded)
    loaded = torch_model.loaded
    layers = find_bn_layers(torch_model)
    if config.method != "gaussian" and not layers:
        folded = "BN was folded into the Conv layers" if bn_folded(loaded.model) else "it has no BatchNormalization layers"
        raise NoBatchNormError(
            f"{loaded.path.name} carries no BatchNorm statistics ({folded}); --method {config.method} needs them. "
            "Use --method gaussian (with dsgonnx quantize: --calib gaussian or real images) for now, "
            "or export the model with BN kept "
            "(torch.onnx.export(..., training=TrainingMode.PRESERVE, do_constant_folding=False))"
        )
    device = resolve_device(config.device)
    channels_last = device.type == "cpu" if config.channels_last is None else config.channels_last
    module = torch_model.module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    box = pixel_box(config, loaded.input.chw[0])
    if box is not None:
        box = (box[0].to(device), box[1].to(device))
    elif config.method != "gaussian":
        say("synthesize: no preprocessing given (--preprocess/--mean/--std): images are shaped by the "
            "input prior alone (per-channel mean 0, std 1), not kept inside a pixel range", config.quiet)

    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    batch = config.batch_size or default_batch_size(config, loaded, len(layers))
    targets = _targets(layers, device)
    images, batch_losses, all_stats, iter_seconds = [], [], [], []
    spans = _batches(config.num_samples, batch)
    for number, (first, last) in enumerate(spans, 1):
        init = torch.randn((last - first, *loaded.input.chw), generator=generator)
        if box is not None:
            init = torch.maximum(torch.minimum(init.to(device), box[1]), box[0]).cpu()
        label = f"synthesize {config.method}" + (f" [batch {number}/{len(spans)}]" if len(spans) > 1 else "")
        result, layer_losses, stats, per_iter = _optimise(
            torch_model, layers, targets, init, config, device, box, channels_last, generator, label, first
        )
        images.append(result)
        batch_losses.append(layer_losses)
        all_stats.append(stats)
        iter_seconds.extend(per_iter)
    images_np = np.concatenate([im.numpy() for im in images]).astype(np.float32)
    merged_stats = [
        (torch.cat([s[i][0] for s in all_stats]), torch.cat([s[i][1] for s in all_stats])) for i in range(len(layers))
    ] if layers else []
    diversity = diversity_metrics(merged_stats, [(m.cpu(), s.cpu()) for m, s in targets]) if layers else {}
    final_losses = {
        layer.name: round(float(np.mean([b[i] for b in batch_losses])), 6) for i, layer in enumerate(layers)
    }
    seconds = time.perf_counter() - start
    meta = {
        "method": config.method,
        "config": config.to_dict(),
        "model": {"file": str(loaded.path), "sha256": loaded.sha256, "input": loaded.input.name},
        "device": str(device),
        "batch_size": batch,
        "num_bn_layers": len(layers),
        "pixel_box": None if box is None else {"low": box[0].flatten().tolist(), "high": box[1].flatten().tolist()},
        "seconds": round(seconds, 3),
        "seconds_per_iter": round(float(np.mean(iter_seconds)), 5) if iter_seconds else None,
        "final_layer_losses": final_losses,
        "diversity": diversity,
        "torch": torch.__version__,
    }
    say(f"synthesize: {config.num_samples} {config.method} images in {seconds:.1f}s on {device}"
        + (f"; sample_similarity {diversity['sample_similarity']:.4f}, stat_spread {diversity['stat_spread']:.4f}"
           if diversity.get("sample_similarity") is not None else ""), config.quiet)
    return SyntheticSet(images=images_np, meta=meta)


def _optimise(torch_model, layers, targets, init, config, device, box, channels_last, generator, label, first):
    """Optimise one batch; returns (images on CPU, final per-layer losses, per-sample stats, s/iter)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = init.to(device).contiguous(memory_format=memory_format)
    tap = _StatsTap(torch_model, layers, keep_inputs=config.method == "dsg" and config.slack) if layers else None
    margins: list[Optional[Margins]] = [None] * len(layers)
    per_iter: list[float] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (config.amp and device.type == "cuda") else None
    try:
        if config.method != "gaussian" and tap is not None:
            with torch.no_grad():
                torch_model.module(images)
            if config.method == "dsg" and config.slack:
                margins = [
                    slack_margins(x, mean, std, config.epsilon, config.slack_reading)
                    for x, (mean, std) in zip(tap.inputs, targets)
                ]
                tap._keep_inputs = False
                tap.inputs = [None] * len(layers)
            full_iters = config.iters
            if config.low_res and config.iters:
                low_iters = int(round(config.iters * config.low_res_share))
                small = _low_res_start(torch_model, images, config.low_res, box, config.quiet)
                if small is not None:
                    small = _run_iterations(torch_model, layers, targets, small, margins, tap, config, device, box,
                                            generator, f"{label} @{config.low_res}px", per_iter, autocast, first,
                                            low_iters)
                    images = _project(torch.nn.functional.interpolate(
                        small, size=images.shape[2:], mode="bilinear", align_corners=False), box)
                    images = images.contiguous(memory_format=memory_format)
                    full_iters = config.iters - low_iters
            images = _run_iterations(torch_model, layers, targets, images, margins, tap, config, device, box,
                                     generator, label, per_iter, autocast, first, full_iters)
        with torch.no_grad():
            if tap is not None:
                torch_model.module(images)
                layer_losses = [
                    losses.bn_alignment(m, s, tm, ts, *(() if mg is None else (mg.mean, mg.std))).mean().item()
                    for (m, s), (tm, ts), mg in zip(tap.stats, targets, margins)
                ]
                stats = [(m.detach().cpu(), s.detach().cpu()) for m, s in tap.stats]
            else:
                layer_losses, stats = [], []
    finally:
        if tap is not None:
            tap.probe.remove()
    return images.detach().contiguous().cpu(), layer_losses, stats, per_iter


def _project(images: torch.Tensor, box) -> torch.Tensor:
    return images if box is None else torch.maximum(torch.minimum(images, box[1]), box[0])


def _low_res_start(torch_model, images, size: int, box, quiet: bool):
    """The batch downsampled to ``size``², or None (with a note) when the graph only
    runs at its own resolution (e.g. a Reshape to a fixed feature size)."""
    if size >= min(images.shape[2:]):
        return None
    small = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    small = _project(small, box).contiguous(memory_format=torch.channels_last
                                            if images.is_contiguous(memory_format=torch.channels_last)
                                            else torch.contiguous_format)
    try:
        with torch.no_grad():
            torch_model.module(small[:1])
    except Exception:  # shape-specialised graph: optimise at full resolution only
        say(f"synthesize: the model does not run at {size}px; no resolution schedule", quiet)
        return None
    return small


def _run_iterations(torch_model, layers, targets, images, margins, tap, config, device, box, generator, label,
                    per_iter, autocast, first, iters):
    images = images.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=config.patience,
                                                           min_lr=1e-4)
    n = images.shape[0]
    weights = losses.lse_weights(n, len(layers), config.method == "dsg" and config.lse, first).to(device)
    use_sci = config.method == "dsg" and config.sci and n > 1
    labels = None
    if config.ce_weight > 0:
        classes = torch_model.loaded.num_classes or 1000
        labels = torch.randint(0, classes, (n,), generator=generator).to(device)
    progress = Progress(label, iters, quiet=config.quiet)
    for iteration in range(iters):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if autocast is not None:
            with autocast:
                output = torch_model.module(images)
        else:
            output = torch_model.module(images)
        layer_losses = torch.stack(
            [losses.bn_alignment(m, s, tm, ts, *(() if mg is None else (mg.mean, mg.std)))
             for (m, s), (tm, ts), mg in zip(tap.stats, targets, margins)],
            dim=1,
        )
        terms = {"bn": losses.combine_layers(layer_losses, weights)}
        if config.input_prior:
            terms["input_prior"] = losses.input_prior(images).mean()
        if use_sci:
            reference = torch.randn(images.shape, generator=generator).to(device)
            terms["sci"] = losses.sample_correlation_inhibition(images, reference) / len(layers)
        if labels is not None:
            logits = (output[0] if isinstance(output, (tuple, list)) else output).float().reshape(n, -1)
            terms["cross_entropy"] = config.ce_weight * torch.nn.functional.cross_entropy(logits, labels)
        if config.tv_weight:
            terms["total_variation"] = config.tv_weight * losses.total_variation(images)
        if config.l2_weight:
            terms["l2"] = config.l2_weight * images.float().flatten(1).norm(dim=1).mean()
        total = sum(terms.values())
        if not torch.isfinite(total):
            bad = next((name for name, value in terms.items() if not torch.isfinite(value)), "total")
            raise SynthesisError(
                f"synthesis diverged: loss term '{bad}' became {terms.get(bad, total).item()} at iteration "
                f"{iteration}; try a smaller --lr (now {config.lr}) or give the model's preprocessing"
            )
        total.backward()
        optimizer.step()
        if box is not None:
            with torch.no_grad():
                images.copy_(_project(images, box))
        loss_value = float(total.detach())
        scheduler.step(loss_value)
        per_iter.append(time.perf_counter() - tick)
        progress.update(iteration + 1, f"loss {loss_value:.4g} lr {optimizer.param_groups[0]['lr']:.2g}")
    progress.close()
    return images.detach()
