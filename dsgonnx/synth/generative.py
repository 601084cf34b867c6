"""A conditional generator trained against the float model: fresh synthetic images every step.

Quantization-aware training on a fixed synthetic set overfits it (measured on ResNet-20 W4A4:
100 DSG images, the distillation loss on them 1.54 → 0.42 while top-1 fell 68.7 → 27.8). The
generative data-free QAT papers (GDFQ, Xu et al. ECCV 2020; DSG's TPAMI version, Qin et al.
2023) train a generator alongside the quantized model instead, so that every step sees new
samples. This module is that generator and its loss:

- :class:`ConditionalGenerator`: GDFQ's design — a latent vector times a learned embedding of
  the wanted class, a linear layer to a small feature map, then ×2 upsampling + 3×3 conv + BN +
  LeakyReLU stages up to the model's input size. Its last layer maps into the model's pixel
  box (``low + (high-low)·(tanh+1)/2``) when the preprocessing is known, else it ends in a
  BatchNorm without affine parameters (GDFQ's normalised output).
- :class:`GeneratorTrainer`: one Adam step of the generator against the float model with BN
  taps: cross-entropy to the wanted classes plus a BN statistics term, either GDFQ's
  (``bns``: batch statistics of each BN input held to the running statistics) or DSG's
  (``dsg``: per-sample statistics with slack margins, layerwise sample enhancement and sample
  correlation inhibition, as :mod:`.generator` synthesises with them). The step returns the
  images it made and the float model's logits on them, which the quantized student then
  learns from (no second teacher pass).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GENERATOR_LOSSES as LOSSES
from ..errors import DataError, NoBatchNormError
from ..graph.bn_taps import BNLayer, BNProbe, find_bn_layers
from ..graph.to_torch import TorchModel
from . import losses
from .latent import init_parameters
from .margins import Margins, slack_margins


def logits(output) -> torch.Tensor:
    """A model's first output as float ``(N, classes)`` logits."""
    out = output[0] if isinstance(output, (tuple, list)) else output
    return out.reshape(len(out), -1).float()


class ConditionalGenerator(nn.Module):
    """Images ``(N, C, H, W)`` from latent vectors and class labels (GDFQ's generator,
    generalised to any input size: as many ×2 stages as bring the first map to ≤ 8 pixels)."""

    def __init__(self, num_classes: int, chw: tuple[int, int, int], latent: int = 256, width: int = 128,
                 box: Optional[tuple[torch.Tensor, torch.Tensor]] = None, seed: Optional[int] = None):
        super().__init__()
        channels, height, width_px = chw
        self.chw, self.latent = chw, latent
        stages = max(2, math.ceil(math.log2(max(height, width_px) / 8)))
        self.start = (max(1, math.ceil(height / 2**stages)), max(1, math.ceil(width_px / 2**stages)))
        self.embed = nn.Embedding(num_classes, latent)
        self.project = nn.Linear(latent, width * self.start[0] * self.start[1])
        self.width = width
        blocks: list[nn.Module] = [nn.BatchNorm2d(width)]
        current = width
        for stage in range(stages):
            out = max(32, width // 2 ** max(0, stage))
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(current, out, 3, padding=1), nn.BatchNorm2d(out, momentum=0.2),
                       nn.LeakyReLU(0.2, inplace=True)]
            current = out
        blocks.append(nn.Conv2d(current, channels, 3, padding=1))
        self.body = nn.Sequential(*blocks)
        if box is None:
            self.finish: nn.Module = nn.BatchNorm2d(channels, affine=False)
            self.register_buffer("low", None)
            self.register_buffer("high", None)
        else:
            self.finish = nn.Identity()
            self.register_buffer("low", box[0].reshape(1, channels, 1, 1).float())
            self.register_buffer("high", box[1].reshape(1, channels, 1, 1).float())
        if seed is not None:
            self.reset_parameters(torch.Generator().manual_seed(seed))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """torch's default initialisation, drawn from ``generator``."""
        init_parameters(self, generator)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(z * self.embed(labels)).reshape(len(z), self.width, *self.start)
        x = self.body(h)
        if x.shape[2:] != self.chw[1:]:
            x = F.interpolate(x, size=self.chw[1:], mode="bilinear", align_corners=False)
        if self.low is None:
            return self.finish(x)
        return self.low + (self.high - self.low) * (torch.tanh(x) + 1) / 2


def generator_saved_bytes(chw: tuple[int, int, int], device: torch.device) -> int:
    """Bytes a :class:`ConditionalGenerator` for images ``chw`` keeps for its backward pass per
    image (the tensors autograd saves but its weights, each storage once, on a batch of two in
    training mode). Its stages follow the image size, not the classifier's: at 224 px 27 MB an
    image, more than MobileNet v1 0.25's own activations (17 MB); at 32 px 1.5 MB."""
    generator = ConditionalGenerator(2, chw).to(device).train()
    weights = {t.untyped_storage().data_ptr() for t in (*generator.parameters(), *generator.buffers())}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    z = torch.zeros((2, generator.latent), device=device)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        generator(z, torch.zeros(2, dtype=torch.long, device=device))
    return sum(saved.values()) // 2


class GeneratorTrainer:
    """Trains a :class:`ConditionalGenerator` against ``teacher`` (the float model with its
    BN statistics) one step at a time; :meth:`step` returns fresh images and the teacher's
    logits on them.

    ``loss``: ``dsg`` (slack alignment with ``epsilon``/``slack_reading`` margins measured on a
    Gaussian batch in the pixel box, LSE, SCI) or ``bns`` (GDFQ). ``bn_weight`` weighs the BN
    term against the cross-entropy (GDFQ: 0.1). ``to_input``: ``(scale, shift)`` the images are
    handed out with, ``scale·x + shift``, where the student takes another scale than
    ``teacher`` (a uint8 model's pixels, the teacher its unit-pixel twin).
    """

    def __init__(self, teacher: TorchModel, num_classes: int, batch_size: int, device: torch.device, *,
                 loss: str = "dsg", lr: float = 1e-3, bn_weight: float = 0.1, epsilon: float = 0.9,
                 slack_reading: str = "channel-upper",
                 box: Optional[tuple[torch.Tensor, torch.Tensor]] = None, seed: int = 0,
                 to_input: Optional[tuple[float, float]] = None):
        if loss not in LOSSES:
            raise ValueError(f"unknown generator loss {loss!r}; choose from {', '.join(LOSSES)}")
        self.layers: list[BNLayer] = find_bn_layers(teacher)
        if not self.layers:
            raise NoBatchNormError(f"{teacher.loaded.source.name} carries no BatchNorm statistics for QAT's "
                                   "generator to train against; use --qat-data calib (QAT then trains on the "
                                   "calibration images)")
        self.teacher, self.device, self.loss, self.bn_weight = teacher, device, loss, bn_weight
        self.to_input = to_input
        self.num_classes, self.batch_size = max(2, num_classes), batch_size
        self.module = teacher.module.to(device).float().eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        chw = teacher.loaded.input.chw
        self.generator = ConditionalGenerator(self.num_classes, chw, box=None if box is None else (box[0].cpu(), box[1].cpu()),
                                              seed=seed).to(device)
        self.optimiser = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        self.random = torch.Generator().manual_seed(seed)
        self.noise = (self.random if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed))
        self.targets = [(torch.from_numpy(layer.running_mean).float().to(device),
                         torch.sqrt(torch.from_numpy(layer.running_var).float().to(device) + layer.eps))
                        for layer in self.layers]
        self._inputs: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        self._probe = BNProbe(teacher, self.layers, lambda layer, x: self._inputs.__setitem__(index[layer.name], x))
        self.margins: list[Optional[Margins]] = [None] * len(self.layers)
        if loss == "dsg":
            start = torch.randn((batch_size, *chw), generator=self.random).to(device)
            if box is not None:
                start = torch.maximum(torch.minimum(start, box[1].to(device)), box[0].to(device))
            with torch.no_grad():
                self.module(start)
            self.margins = [slack_margins(x.float(), mean, std, epsilon, slack_reading)
                            for x, (mean, std) in zip(self._inputs, self.targets)]
        self.steps = 0
        self.last: dict[str, float] = {}

    def close(self) -> None:
        self._probe.remove()

    def _bn_term(self) -> torch.Tensor:
        if self.loss == "bns":  # GDFQ: the batch's statistics of each BN input against the running ones
            terms = []
            for x, (mean, std) in zip(self._inputs, self.targets):
                flat = x.float().transpose(0, 1).flatten(1)
                var, mu = torch.var_mean(flat, dim=1)
                terms.append(F.mse_loss(mu, mean, reduction="sum") / len(mean)
                             + F.mse_loss(torch.sqrt(var + 1e-6), std, reduction="sum") / len(std))
            return torch.stack(terms).mean()
        per_layer = torch.stack([
            losses.bn_alignment(*losses.per_sample_stats(x), mean, std,
                                *(() if margin is None else (margin.mean, margin.std)))
            for x, (mean, std), margin in zip(self._inputs, self.targets, self.margins)], dim=1)
        weights = losses.lse_weights(len(per_layer), len(self.layers), True, self.steps * len(per_layer)).to(self.device)
        return losses.combine_layers(per_layer, weights) / len(self.layers)

    def evaluate(self, z: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The cross-entropy and BN term of the generator's images for fixed ``z``, ``labels``
        (no step; the generator's BN layers use the batch's statistics, as in training)."""
        self.generator.train()
        with torch.no_grad():
            images = self.generator(z, labels)
            result = {"cross_entropy": float(F.cross_entropy(logits(self.module(images)), labels)),
                      "bn": float(self._bn_term())}
        self._inputs = [None] * len(self.layers)
        return result

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn((n, self.generator.latent), generator=self.random).to(self.device)
        labels = torch.randint(0, self.num_classes, (n,), generator=self.random).to(self.device)
        return z, labels

    def step(self, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """One generator step (``train=False``: none, only images): returns a fresh batch of
        images (detached) and the teacher's logits on them."""
        z, labels = self.sample(self.batch_size)
        self.generator.train(train)
        with torch.set_grad_enabled(train):
            images = self.generator(z, labels)
            scores = logits(self.module(images))
            if train:
                cross_entropy = F.cross_entropy(scores, labels) if scores.shape[1] > 1 else \
                    F.binary_cross_entropy_with_logits(scores[:, 0], (labels % 2).float())
                bn = self._bn_term()
                total = cross_entropy + self.bn_weight * bn
                terms = {"cross_entropy": cross_entropy, "bn": bn}
                if self.loss == "dsg" and len(images) > 1:
                    reference = torch.randn(images.shape, generator=self.noise, device=self.device)
                    terms["sci"] = losses.sample_correlation_inhibition(images, reference) / len(self.layers)
                    total = total + terms["sci"]
                if not torch.isfinite(total):
                    bad = next((k for k, v in terms.items() if not torch.isfinite(v)), "total")
                    raise DataError(f"qat: the generator's loss term '{bad}' became "
                                    f"{float(terms.get(bad, total).detach())} at step {self.steps + 1}; "
                                    "lower --qat-generator-lr")
                self.optimiser.zero_grad(set_to_none=True)
                total.backward()
                self.optimiser.step()
                self.last = {k: float(v.detach()) for k, v in terms.items()}
                self.steps += 1
        self._inputs = [None] * len(self.layers)
        images = images.detach()
        if self.to_input is not None:  # (the teacher takes another scale than the student: theirs)
            images = images * self.to_input[0] + self.to_input[1]
        return images, scores.detach()

    def state_dict(self) -> dict:
        return {"generator": self.generator.state_dict(), "optimiser": self.optimiser.state_dict(),
                "random": self.random.get_state(), "steps": self.steps,
                **({"noise": self.noise.get_state()} if self.noise is not self.random else {})}

    def load_state_dict(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.random.set_state(state["random"])
        if "noise" in state and self.noise is not self.random:
            self.noise.set_state(state["noise"])
        self.steps = int(state["steps"])
