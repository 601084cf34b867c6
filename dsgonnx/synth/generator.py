"""The synthesis loop: Gaussian or procedural images optimised against the model.

One readable loop per batch: forward (BN inputs captured by hooks) → per-sample
statistics → layer losses (ZeroQ alignment or DSG slack alignment) → layer/sample
weights (LSE) → priors and SCI → Adam step → projection into the pixel box.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch

from .. import distributed
from ..artifacts import SyntheticSet
from ..config import Alignment, SynthConfig, SynthMethod, SynthStart
from ..errors import NoBatchNormError, SynthesisError
from ..graph.bn_taps import BNLayer, BNProbe, bn_folded, find_bn_layers, stateless_norms
from ..graph.onnx_io import LoadedModel, from_unit_pixels, load_model, unit_pixel_twin
from ..graph.to_torch import TorchModel, resolve_device, to_torch
from ..hardware import MEMORY_SHARE, check_image_memory, freed_memory_kept, memory_on
from ..preprocess import PRESETS
from ..progress import Progress, say
from . import losses
from .diversity import diversity_metrics
from .latent import DECAY, DECAY_EVERY, GENERATOR_BATCH, GENERATOR_LR, LatentGenerator
from .margins import Margins, slack_margins
from .procedural import procedural_images


# iterations between host reads of the loss (the NaN check, the plateau schedule, progress):
# every step on the CPU, where reading costs nothing; on CUDA every 16th, so the GPU never
# waits for the host inside them (the schedule then acts up to 15 iterations late)
SYNC_EVERY = {"cpu": 1, "cuda": 16}


def pixel_box(config: SynthConfig, channels: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel bounds ``(1, C, 1, 1)`` of real images in the model's input space."""
    if config.preprocess is None:
        return None
    low, high = config.preprocess.pixel_box(channels)
    return torch.from_numpy(low), torch.from_numpy(high)


class _StatsTap:
    """Collects per-sample statistics of every BN input during a forward pass."""

    def __init__(self, model: TorchModel, layers: list[BNLayer], keep_inputs: bool = False):
        self.stats: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(layers)
        self.inputs: list[Optional[torch.Tensor]] = [None] * len(layers)
        self._index = {layer.name: i for i, layer in enumerate(layers)}
        self._keep_inputs = keep_inputs
        self.probe = BNProbe(model, layers, self._record)

    def stop_keeping_inputs(self) -> None:
        self._keep_inputs = False
        self.inputs = [None] * len(self.inputs)

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


def default_batch_size(config: SynthConfig, loaded: LoadedModel, num_layers: int, ranks: int = 1) -> int:
    """All samples at once (a share per rank: one batch each) up to 50 M input values per
    batch (about 330 images of 3×224², far more for 32² ones), or up to ``GENERATOR_BATCH``
    with ``generator``; a model with a fixed batch size gets that size."""
    per_image = int(np.prod(loaded.input.chw))
    cap = max(1, int(50_000_000 // per_image))
    size = min(-(-config.num_samples // ranks), cap)
    if config.generator:  # a generator's feature maps cost far more than the images (Genie: 128 per generator)
        size = min(size, GENERATOR_BATCH)
    if loaded.input.shape[0] is not None:
        size = loaded.input.shape[0]
    return size


# what a synthesis batch costs per image besides the image, in units of the activations one
# forward pass of it makes (every leaf module's output): the largest marginal cost measured on
# CPU, peak resident memory between batches of two sizes (16 and 48 images at 224 px, 64 and 256
# at 32 px; 3 iterations), was MobileNet v1 0.25's 1.69 with freed memory kept for reuse as
# synthesis keeps it (hardware.freed_memory_kept), 1.59 without (v1 0.75: 1.21 / 1.18,
# EfficientNet-Lite0 1.14 / 0.96, ResNet-20 0.88 / 0.86; 1.44 when first measured)
ACTIVATION_COPIES = 1.75


def activation_bytes(module: torch.nn.Module, chw, device, memory_format) -> int:
    """Bytes of every leaf module's output for one image (one forward pass without gradients)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()

    hooks = [m.register_forward_hook(count) for m in module.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            module(torch.zeros((1, *chw), device=device).contiguous(memory_format=memory_format))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def memory_batch_cap(per_image: int, device: torch.device, sharing: int = 1) -> Optional[tuple[int, int]]:
    """(images per batch whose activations, ``per_image`` bytes each times :data:`ACTIVATION_COPIES`,
    fit in :data:`MEMORY_SHARE` of the memory available, that memory in bytes): the GPU's free
    memory, else the machine's shared by ``sharing`` processes; None where unknown."""
    have = memory_on(device)
    if have is None:
        return None
    if device.type != "cuda":
        have //= max(1, sharing)
    return max(1, int(MEMORY_SHARE * have // (ACTIVATION_COPIES * max(per_image, 1)))), have


def _batch_seed(seed: int, first: int) -> int:
    """The random seed of the batch whose first sample is ``first``."""
    return seed if first == 0 else int(np.random.SeedSequence([seed, first]).generate_state(1, np.uint64)[0] >> 1)


def _prepare(model, config: SynthConfig, drop_unread: bool = False):
    """(torch twin, config with the method decided, why it was decided, the BN layers it uses)."""
    if isinstance(model, TorchModel) and not config.mix_models:
        torch_model = model
    else:
        loaded = model.loaded if isinstance(model, TorchModel) else \
            model if isinstance(model, LoadedModel) else load_model(model)
        if config.mix_models:  # one graph: the model and its companions on the same images
            from ..graph.merge import with_companions

            loaded = with_companions(loaded, config.mix_models)
        torch_model = to_torch(loaded)
    loaded = torch_model.loaded
    check_image_memory(config.num_samples, loaded.input.chw)
    if loaded.takes_pixels:  # uint8 pixels: optimised as u = p / 127.5 - 1 (the file's box, 0-255, in u)
        raw = loaded.preprocess_for(config.preprocess)
        torch_model = to_torch(unit_pixel_twin(loaded))
        config = replace(config, preprocess=replace(PRESETS["inception"], resize=raw.resize, crop=raw.crop,
                                                    channel_order=raw.channel_order, crop_fraction=raw.crop_fraction))
    layers = find_bn_layers(torch_model)
    config, why = config.for_model(bool(layers), drop_unread)
    if why is not None:
        say(f"synthesize: method {config.method} ({why})")
    if config.method.needs_bn and not layers:
        folded, norms = bn_folded(loaded.model), stateless_norms(loaded.model)
        why = ("BN was folded into the Conv layers" if folded else
               f"it normalises with {' and '.join(norms)}, which keeps no running statistics" if norms else
               "it has no BatchNormalization layers")
        raise NoBatchNormError(
            f"{loaded.source.name} carries no BatchNorm statistics ({why}); `method` {config.method} needs them. "
            f"Use `method` {SynthMethod.AUTO} (picks a BN-free source), {SynthMethod.PROCEDURAL} or "
            f"{SynthMethod.INVERSION}, or real images"
            + (", or export the model with BN kept (torch.onnx.export(..., training=TrainingMode.PRESERVE, "
               "do_constant_folding=False))" if folded else "")
        )
    # inversion, procedural and gaussian images ignore BN statistics the model may carry
    return torch_model, config, why, layers if config.method.needs_bn else []


def synthesize(
    model: str | LoadedModel | TorchModel,
    config: Optional[SynthConfig] = None,
    *,
    drop_unread: bool = False,
    **overrides,
) -> SyntheticSet:
    """Synthesize calibration images for ``model`` (a path, loaded model or torch twin).

    Raises :class:`NoBatchNormError` for zeroq/dsg on a model without BN statistics, and
    :class:`DataError` for options the method decided does not read, unless ``drop_unread``
    (:meth:`SynthConfig.for_model`).
    """
    config = replace(config or SynthConfig(), **overrides) if overrides else (config or SynthConfig())
    start = time.perf_counter()
    device = resolve_device(config.device)
    world = distributed.join_device(config.device)
    if world is not None and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    given = config.preprocess  # (a uint8 model's synthesis runs on another scale: this recipe is restored after)
    torch_model, config, why, layers = distributed.together(lambda: _prepare(model, config, drop_unread))
    loaded = torch_model.loaded
    if world is not None:
        distributed.agree("the synthesis settings and the model",
                          (json.dumps(config.to_dict(), sort_keys=True, default=str), loaded.sha256))
    config = config.for_device(device.type, min(loaded.input.chw[1:]))
    if config.method.drawn:
        config = replace(config, iters=0, low_res=None)
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
    elif not config.method.drawn:
        say("synthesize: no preprocessing given (`preprocess`): images are shaped by the "
            "input prior alone (per-channel mean 0, std 1), not kept inside a pixel range")

    ranks = world.size if world is not None else 1
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batch = config.batch_size or default_batch_size(config, loaded, len(layers), ranks)
    if config.batch_size is None and loaded.input.shape[0] is None and not config.method.drawn:
        # the images are counted apart (check_image_memory); the activations of a batch grow
        # with the network, not the input: 16,276 of ResNet-20's 32-px images (the input cap)
        # took 42 GB and the machine's memory killed the run
        per_image = activation_bytes(module, loaded.input.chw, device, memory_format)
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
        caps = distributed.exchange(memory_batch_cap(per_image, device, sharing))  # every rank the same batches
        if None not in caps and min(fits for fits, _ in caps) < batch:
            fits, have = min(caps)
            say(f"synthesize: batches of {fits} images, not {batch}: one image's activations take about "
                f"{ACTIVATION_COPIES * per_image / 2**20:.0f} MiB while it is optimised, and "
                f"{have / 2**30:.1f} GiB {'of GPU memory is free' if device.type == 'cuda' else 'is available'} "
                "(`batch_size` sets it; the batches shape the images)")
            batch = fits
    run = _Run(torch_model, layers, _targets(layers, device), config, device, box, torch.Generator(),
               memory_format,
               torch.autocast("cuda", dtype=torch.bfloat16) if (config.amp and device.type == "cuda") else None)
    spans = _batches(config.num_samples, batch)
    rank = world.rank if world is not None else 0

    def my_batches() -> list[tuple]:
        done = []
        for number, (first, last) in list(enumerate(spans, 1))[rank::ranks]:
            # each batch's randomness from (seed, its first sample) alone: the set does not
            # depend on which rank made which batch (the first batch keeps the plain seed)
            run.reseed(_batch_seed(config.seed, first))
            if config.method in (SynthMethod.PROCEDURAL, SynthMethod.INVERSION) or config.start == SynthStart.PROCEDURAL:
                init = torch.from_numpy(procedural_images(last - first, loaded.input.chw, config.seed,
                                                          config.preprocess, first))
            else:
                init = torch.randn((last - first, *loaded.input.chw), generator=run.generator)
            if box is not None:
                init = torch.maximum(torch.minimum(init.to(device), box[1]), box[0]).cpu()
            label = (f"synthesize {config.method}" + (f" [batch {number}/{len(spans)}]" if len(spans) > 1 else "")
                     + (f" rank {rank}" if world is not None else ""))
            result, layer_losses, stats = run.optimise(init, label, first)
            done.append((first, result.numpy(), layer_losses, stats, run.labels.get(first)))
        return done

    with freed_memory_kept() as kept:
        mine = distributed.together(my_batches)
    everyone = distributed.exchange((mine, run.iter_seconds))
    done = sorted((part for parts, _ in everyone for part in parts), key=lambda part: part[0])
    iter_seconds = [s for _, seconds in everyone for s in seconds]
    images = [part[1] for part in done]
    batch_losses = [part[2] for part in done]
    all_stats = [part[3] for part in done]
    labels = [int(c) for part in done if part[4] is not None for c in part[4]]
    images_np = np.concatenate(images).astype(np.float32)
    if loaded.takes_pixels:  # back to the file's whole pixels 0-255
        images_np = from_unit_pixels(images_np)
        config = replace(config, preprocess=loaded.preprocess_for(given))
        box = tuple(torch.from_numpy(bound) for bound in config.preprocess.pixel_box(loaded.input.chw[0]))
    merged_stats = [
        (torch.cat([s[i][0] for s in all_stats]), torch.cat([s[i][1] for s in all_stats])) for i in range(len(layers))
    ] if layers else []
    diversity = diversity_metrics(merged_stats, [(m.cpu(), s.cpu()) for m, s in run.targets]) if layers else {}
    final_losses = {
        layer.name: round(float(np.mean([b[i] for b in batch_losses])), 6) for i, layer in enumerate(layers)
    }
    seconds = time.perf_counter() - start
    meta = {
        "method": config.method.value,
        "method_choice": why,
        "config": config.to_dict(),
        "model": {"file": str(loaded.source), "sha256": loaded.sha256, "input": loaded.input.name},
        "device": str(device),
        "batch_size": batch,
        "num_bn_layers": len(layers),
        "pixel_box": None if box is None else {"low": box[0].flatten().tolist(), "high": box[1].flatten().tolist()},
        "seconds": round(seconds, 3),
        "seconds_per_iter": round(float(np.mean(iter_seconds)), 5) if iter_seconds else None,
        "final_layer_losses": final_losses,
        # the class the cross-entropy pulled each image towards (binary heads: 0/1)
        "target_classes": labels or None,
        "ranks": ranks,
        "diversity": diversity,
        "torch": torch.__version__,
        # whether freed memory was kept for reuse while the images were made, which moves
        # seconds_per_iter (hardware.freed_memory_kept)
        "freed_memory_kept": kept,
    }
    say(f"synthesize: {config.num_samples} {config.method} images in {seconds:.1f}s on {device}"
        + (f"; sample_similarity {diversity['sample_similarity']:.4f}, stat_spread {diversity['stat_spread']:.4f}"
           if diversity.get("sample_similarity") is not None else ""))
    return SyntheticSet(images=images_np, meta=meta)


class _Hooks:
    """Hooks on a model's modules (``_handles``) that come off together: :meth:`remove`, or
    the end of a ``with`` block."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        self.remove()


class _Anchor(_Hooks):
    """Inversion's anchor: forward hooks that keep every Conv output of the current step, and
    as targets each Conv output channel's mean and std over the batch of start images (the
    procedural images: statistics of natural-looking input, where a folded model has no BN
    statistics to offer)."""

    def __init__(self, module: torch.nn.Module, start: torch.Tensor):
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        self.outputs: list[Optional[torch.Tensor]] = [None] * len(convs)
        self._handles = [conv.register_forward_hook(self._keeper(i)) for i, conv in enumerate(convs)]
        with torch.no_grad():
            module(start)
            self.targets = [(x.float().mean(dim=(0, 2, 3)), x.float().transpose(0, 1).flatten(1).std(dim=1))
                            for x in self.outputs]

    def _keeper(self, index: int):
        def keep(_module, _args, output):
            self.outputs[index] = output
        return keep

    def __bool__(self) -> bool:
        return bool(self._handles)


def _project(images: torch.Tensor, box) -> torch.Tensor:
    return images if box is None else torch.maximum(torch.minimum(images, box[1]), box[0])


class _Swing(_Hooks):
    """Genie's swing convolution, while attached: every strided Conv2d sees its input
    reflected by one pixel at each border and cropped back at an offset of −1, 0 or +1 in
    each direction, drawn from ``random`` at each forward."""

    def __init__(self, module: torch.nn.Module, random: torch.Generator):
        self.random = random
        self._handles = [conv.register_forward_pre_hook(self._shift) for conv in module.modules()
                         if isinstance(conv, torch.nn.Conv2d) and max(conv.stride) > 1]

    def _shift(self, _conv, args):
        x = args[0]
        if min(x.shape[2:]) < 2:  # nothing to reflect
            return None
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=self.random))
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        return (padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]], *args[1:])


class _Pixels:
    """The images themselves are what Adam learns (the papers' synthesis); each step ends
    with the images projected into the pixel box. One per resolution of the schedule."""

    def __init__(self, images: torch.Tensor, lr: float, box):
        self.images, self.box, self.count = images.clone().requires_grad_(True), box, len(images)
        self.optimizers = [torch.optim.Adam([self.images], lr=lr)]

    def __call__(self) -> torch.Tensor:
        return self.images

    def stepped(self, iteration: int) -> None:
        if self.box is not None:
            with torch.no_grad():
                self.images.copy_(_project(self.images, self.box))

    def result(self) -> torch.Tensor:
        return self.images.detach()


class _Generated:
    """The images are ``G(z)`` (``generator``; :mod:`.latent`): one generator and one latent
    per image, learned together through the whole resolution schedule (at low resolution the
    model sees ``G(z)`` downsampled), the output projected into the pixel box."""

    def __init__(self, n: int, chw, lr: float, random: torch.Generator, device, box, memory_format):
        self.net = LatentGenerator(chw, random).to(device).train()
        self.z = torch.randn((n, self.net.latent), generator=random).to(device).requires_grad_(True)
        # the latents first: the plateau schedule acts on optimizers[0]
        self.optimizers = [torch.optim.Adam([self.z], lr=lr), torch.optim.Adam(self.net.parameters(), lr=GENERATOR_LR)]
        self.decay = torch.optim.lr_scheduler.ExponentialLR(self.optimizers[1], gamma=DECAY)
        self.box, self.memory_format, self.count = box, memory_format, n
        self.size: Optional[tuple[int, int]] = None

    def __call__(self) -> torch.Tensor:
        return self._images(self.size)

    def stepped(self, iteration: int) -> None:
        if (iteration + 1) % DECAY_EVERY == 0:
            self.decay.step()

    def result(self) -> torch.Tensor:
        with torch.no_grad():
            return self._images(None)

    def _images(self, size: Optional[tuple[int, int]]) -> torch.Tensor:
        images = self.net(self.z)
        if size is not None:
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                                     antialias=True)
        return _project(images, self.box).contiguous(memory_format=self.memory_format)


@dataclass
class _Run:
    """One synthesis run's fixed state: the model, its BN layers and targets, the settings
    (iterations already resolved for the device), the pixel box and the random generator."""

    torch_model: TorchModel
    layers: list[BNLayer]
    targets: list[tuple[torch.Tensor, torch.Tensor]]
    config: SynthConfig
    device: torch.device
    box: Optional[tuple[torch.Tensor, torch.Tensor]]
    generator: torch.Generator
    memory_format: torch.memory_format
    autocast: Optional[torch.autocast]

    def __post_init__(self):
        self.models = 1 + len(self.config.mix_models)  # the BN term is their mean (one model's scale)
        self.noise = self.generator  # SCI's reference noise: on the device (see reseed)
        self.iter_seconds: list[float] = []
        self.labels: dict[int, torch.Tensor] = {}  # first sample of a batch -> its target classes
        self.anchor: Optional[_Anchor] = None
        # the units of each layer's gaps: its running std (``normalize_gaps``; 1 where the graph
        # carries no variance), else None (the papers' absolute gaps)
        self.scales = [torch.where(torch.isfinite(std), std, torch.ones_like(std)) if self.config.normalize_gaps
                       else None for _, std in self.targets]

    def reseed(self, seed: int) -> None:
        """The random streams of one batch: a CPU generator (initial images, labels, jitter) and
        the SCI noise's, on the synthesis device (the CPU generator itself on the CPU)."""
        self.generator = torch.Generator().manual_seed(seed)
        self.noise = (self.generator if self.device.type == "cpu"
                      else torch.Generator(device=self.device).manual_seed(seed))

    def optimise(self, init: torch.Tensor, label: str, first: int):
        """Optimise one batch; returns (images on CPU, final per-layer losses, per-sample stats)."""
        config, model = self.config, self.torch_model.module
        if config.ce_weight > 0:  # one target class per image, kept through the resolution schedule
            classes = self.torch_model.loaded.num_classes or 1000
            self.labels[first] = torch.randint(0, max(classes, 2), (init.shape[0],), generator=self.generator)
        images = init.to(self.device).contiguous(memory_format=self.memory_format)
        if config.method == SynthMethod.INVERSION and config.anchor_weight and config.iters:
            self.anchor = _Anchor(model, images)
        keep = config.method == SynthMethod.DSG and config.slack and config.alignment == Alignment.SAMPLE
        tap = _StatsTap(self.torch_model, self.layers, keep_inputs=keep) if self.layers else None
        margins: list[Optional[Margins]] = [None] * len(self.layers)
        try:
            if tap is not None or config.method == SynthMethod.INVERSION:
                measured = images
                if keep and config.start != SynthStart.GAUSSIAN:  # the margins are the Gaussian batch's (the papers')
                    noise = _project(torch.randn(images.shape, generator=self.generator).to(self.device), self.box)
                    measured = noise.contiguous(memory_format=self.memory_format)
                with torch.no_grad():
                    model(measured)
                if keep:
                    margins = [slack_margins(x, mean, std, config.epsilon, config.slack_reading)
                               for x, (mean, std) in zip(tap.inputs, self.targets)]
                    tap.stop_keeping_inputs()
                full_iters = config.iters
                generated = (_Generated(len(images), images.shape[1:], config.lr, self.generator, self.device, self.box,
                                        self.memory_format) if config.generator else None)
                if config.low_res and config.iters:
                    low_iters = int(round(config.iters * config.low_res_share))
                    small = self._low_res_start(images)
                    if small is not None:
                        low_label = f"{label} @{config.low_res}px"
                        if generated is not None:
                            generated.size = tuple(small.shape[2:])
                            self._iterate(generated, tap, margins, low_label, first, low_iters)
                            generated.size = None
                        else:
                            small = self._iterate(_Pixels(small, config.lr, self.box), tap, margins, low_label, first,
                                                  low_iters)
                            images = _project(torch.nn.functional.interpolate(
                                small, size=images.shape[2:], mode="bilinear", align_corners=False), self.box)
                            images = images.contiguous(memory_format=self.memory_format)
                        full_iters = config.iters - low_iters
                images = self._iterate(generated or _Pixels(images, config.lr, self.box), tap, margins, label, first,
                                       full_iters)
            with torch.no_grad():
                if tap is not None:
                    model(images)
                    layer_losses = [loss.mean().item() for loss in self._layer_losses(tap, margins)]
                    stats = [(m.detach().cpu(), s.detach().cpu()) for m, s in tap.stats]
                else:
                    layer_losses, stats = [], []
        finally:
            if tap is not None:
                tap.probe.remove()
            if self.anchor is not None:
                self.anchor.remove()
                self.anchor = None
        return images.detach().contiguous().cpu(), layer_losses, stats

    def _low_res_start(self, images):
        """The batch downsampled to ``low_res``², or None (with a note) when the graph only
        runs at its own resolution (e.g. a Reshape to a fixed feature size)."""
        size = self.config.low_res
        if size >= min(images.shape[2:]):
            return None
        small = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                                antialias=True)
        small = _project(small, self.box).contiguous(memory_format=self.memory_format)
        try:
            with torch.no_grad():
                self.torch_model.module(small[:1])
        except Exception:  # shape-specialised graph: optimise at full resolution only
            say(f"synthesize: the model does not run at {size}px; no resolution schedule")
            return None
        return small

    def _layer_losses(self, tap, margins) -> list[torch.Tensor]:
        """Each BN layer's alignment loss: per sample ``(N,)`` (with the slack margins where
        given), or ``(1,)`` for the batch's pooled statistics (``alignment`` batch)."""
        batch = self.config.alignment == Alignment.BATCH
        return [losses.bn_alignment(*(losses.pooled_stats(m, s) if batch else (m, s)), tm, ts,
                                    *(() if mg is None else (mg.mean, mg.std)), scale=sc)
                for (m, s), (tm, ts), mg, sc in zip(tap.stats, self.targets, margins, self.scales)]

    def _terms(self, n: int, first: int) -> list[tuple[str, Callable]]:
        """The loss terms of this method and these settings, decided once per batch:
        ``(name, term(images, output, tap) -> scalar)``."""
        config = self.config
        dsg = config.method == SynthMethod.DSG
        weights = losses.lse_weights(n, len(self.layers), dsg and config.lse, first).to(self.device)

        def bn(images, output, tap, margins):
            layer_losses = self._layer_losses(tap, margins)
            if config.alignment == Alignment.BATCH:  # one pooled term per layer: no per-sample weights
                return torch.cat(layer_losses).sum() / self.models
            return losses.combine_layers(torch.stack(layer_losses, dim=1), weights) / self.models

        terms = [("bn", bn)] if self.layers else []
        if config.input_prior:
            terms.append(("input_prior", lambda images, *_: losses.input_prior(images).mean()))
        if (dsg or config.method == SynthMethod.INVERSION) and config.sci and n > 1:
            def sci(images, *_):  # the reference noise drawn where the images are: no host copy per step
                reference = torch.randn(images.shape, generator=self.noise, device=self.device)
                return losses.sample_correlation_inhibition(images, reference) * self.models / max(1, len(self.layers))
            terms.append(("sci", sci))
        if config.ce_weight > 0:
            labels = self.labels[first].to(self.device)
            graph = self.torch_model.loaded.model.graph
            sigmoid_head = any(node.op_type == "Sigmoid" and node.output[0] == graph.output[0].name for node in graph.node)

            def cross_entropy(images, output, *_):
                logits = (output[0] if isinstance(output, (tuple, list)) else output).float().reshape(n, -1)
                if logits.shape[1] == 1:  # a binary head: random 0/1 labels on its one output
                    if sigmoid_head:
                        return config.ce_weight * torch.nn.functional.binary_cross_entropy(
                            logits[:, 0].clamp(1e-6, 1 - 1e-6), labels.float())
                    return config.ce_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                        logits[:, 0], labels.float())
                return config.ce_weight * torch.nn.functional.cross_entropy(logits, labels)
            terms.append(("cross_entropy", cross_entropy))
        if config.anchor_weight and self.anchor:
            def anchor(*_):
                layer_losses = [losses.bn_alignment(*losses.per_sample_stats(x), mean, std).mean()
                                for x, (mean, std) in zip(self.anchor.outputs, self.anchor.targets)]
                return config.anchor_weight * torch.stack(layer_losses).mean()
            terms.append(("anchor", anchor))
        if config.tv_weight:
            terms.append(("total_variation", lambda images, *_: config.tv_weight * losses.total_variation(images)))
        if config.l2_weight:
            terms.append(("l2", lambda images, *_: config.l2_weight * images.float().flatten(1).norm(dim=1).mean()))
        return terms

    def _jitter(self, images: torch.Tensor) -> torch.Tensor:
        """A random shift (up to 1/8 of the side, wrapped around) and a coin-flip mirror of the
        whole batch (DeepInversion's jitter): the cross-entropy then rewards features that
        survive small translations rather than a pattern fixed to the pixel grid."""
        limit = max(1, min(images.shape[2:]) // 8)
        dy, dx = (int(v) for v in torch.randint(-limit, limit + 1, (2,), generator=self.generator))
        moved = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        return torch.flip(moved, dims=(3,)) if float(torch.rand((), generator=self.generator)) < 0.5 else moved

    def _iterate(self, source, tap, margins, label: str, first: int, iters: int) -> torch.Tensor:
        """``iters`` steps of ``source`` (:class:`_Pixels` or :class:`_Generated`); its images."""
        config = self.config
        optimizer = source.optimizers[0]
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=config.patience,
                                                               min_lr=1e-4)
        terms = self._terms(source.count, first)
        progress = Progress(label, iters)
        every = SYNC_EVERY.get(self.device.type, 1)
        pending: list[tuple[int, torch.Tensor]] = []  # (iteration, term values and total) not read yet
        names = [name for name, _ in terms]
        tick = time.perf_counter()
        # (the swing's hooks for these steps alone: the margins and the final read see the model as it is)
        with _Swing(self.torch_model.module, self.generator) if config.swing else contextlib.nullcontext():
            for iteration in range(iters):
                for each in source.optimizers:
                    each.zero_grad(set_to_none=True)
                images = source()
                output = self._forward(images)
                values = [term(images, output, tap, margins) for _, term in terms]
                total = sum(values)
                pending.append((iteration, torch.stack([v.detach().float().reshape(()) for v in (*values, total)])))
                total.backward()
                for each in source.optimizers:
                    each.step()
                source.stepped(iteration)
                if len(pending) == every or iteration == iters - 1:  # the one host sync of these iterations
                    rows = torch.stack([row for _, row in pending]).cpu().tolist()
                    now = time.perf_counter()
                    self.iter_seconds += [(now - tick) / len(rows)] * len(rows)
                    tick = now
                    for (done, _), row in zip(pending, rows):
                        if not math.isfinite(row[-1]):
                            bad = next((name for name, value in zip(names, row) if not math.isfinite(value)), "total")
                            value = row[names.index(bad)] if bad in names else row[-1]
                            raise SynthesisError(
                                f"synthesis diverged: loss term '{bad}' became {value} at iteration {done}; "
                                f"try a smaller `lr` (now {config.lr}) or give the model's preprocessing"
                            )
                        scheduler.step(row[-1])
                        progress.update(done + 1, f"loss {row[-1]:.4g} lr {optimizer.param_groups[0]['lr']:.2g}")
                    pending.clear()
        progress.close()
        return source.result()

    def _forward(self, images: torch.Tensor):
        """The model's output on one step's images: jittered and under autocast, as configured
        (and through swung strided convolutions while :meth:`_iterate` holds the swing)."""
        with self.autocast or contextlib.nullcontext():
            return self.torch_model.module(self._jitter(images) if self.config.jitter else images)
