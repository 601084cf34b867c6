"""Quantization-aware training by distillation from the float model, on calibration images.

The student is the simulation reconstruction trains against (:mod:`.simulate`): the model ORT
is about to quantize (pre-processed, BN folded), converted to torch, with every tensor the
exported QDQ model quantizes fake-quantized on its grid and every other quantized constant on
its exported values. Unlike reconstruction it learns end to end: every quantized Conv/Gemm's
(and weight-matrix MatMul's) float weight and bias (through straight-through
rounding, :class:`~.quantizers.QuantLayer` mode ``train``), each weight's per-channel step and
each activation grid's step (LSQ, Esser et al. 2020, as the log of the step) are trained
together to minimise the mean squared difference of the first output's logits from those
of the teacher, the same float model unquantized (``loss="mse"``), or the data-free QAT
papers' distillation (GDFQ, Xu et al. 2020; Qimera; DSG's TPAMI version)

    T² · KL(softmax(teacher / T) ‖ softmax(student / T))   (``loss="kl"``).

KL is the weaker teacher here: a 4-bit student that disagrees with the teacher on a third
of the images lowers it fastest by flattening its logits (smaller, less confident), and
trained on it, it agrees less with the teacher while the KL falls. The squared difference
of the logits rewards far less shrinking — only the least-squares amount for the student's
noise (Kim et al. 2021, "Comparing Kullback-Leibler divergence and mean squared error loss
in knowledge distillation"). BN is already
folded into the layers, so the student's BN statistics are frozen by construction.
Training starts where plain rounding with bias correction is (each layer's bias less
ΔW·E[x], E[x] measured on the float model over the calibration images), or with ``start=
"squant"`` where SQuant's rounding on the student's own grid is (its flipped elements moved
to their new integers, bias-corrected the same way), or with ``start="refine"`` where
reconstruction left the model (:func:`~.reconstruct.refine_model`'s integers and weight steps,
and its activation steps where it learned them; bias-corrected the same way). Each step trains on
either

- fresh images from a conditional generator trained alongside, one generator step per
  student step, against the float model's BN statistics (:mod:`dsgonnx.synth.generative`;
  GDFQ's scheme, with DSG's losses or GDFQ's), after ``generator_warmup`` steps of the
  generator alone; the teacher's logits come from the generator's own step; or
- a batch drawn from the calibration images, augmented (flips, shifts) so that a fixed set
  is seen in new views, and with ``mix`` half of them blended pairwise (mixup or cutmix);
  the teacher labels every view afresh.

Under ``torchrun`` (:mod:`dsgonnx.distributed`) training on the calibration images is data
parallel: every rank draws the same batch and the same augmentation (one seeded generator),
trains on its share of the batch (every ``size``-th image from its rank on), and the ranks
sum their gradients, each weighted by its share, so every rank takes the step one process
would take on the whole batch (the same to float rounding). A non-finite loss or the time
budget on any rank stops every rank at the same step. The generator's data does not split
(one generator, trained step by step with the student): it is refused under torchrun.

What comes back is what reconstruction returns (:class:`~.reconstruct.RefineResult`): the
nearest integers of the trained weights on their learned steps, the learned activation
steps, and a float model holding the trained biases — the export path is the same, so the
QDQ model holds exactly what was trained.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from .. import distributed
from ..config import DEFAULT_EPSILON, DEFAULT_SLACK_READING, QatConfig
from ..errors import DataError, UnsupportedModelError
from ..graph.onnx_io import PIXEL_HALF_RANGE, LoadedModel, load_model
from ..graph.to_torch import resolve_device, to_torch
from ..hardware import MEMORY_SHARE, freed_memory_kept, memory_on, size_text
from ..progress import Progress, say
from ..quant.correct import conv_shift
from ..quant.placement import Placement
from ..synth.generative import GeneratorTrainer, generator_saved_bytes, logits
from ..synth.generator import ACTIVATION_COPIES, activation_bytes
from ..validation.metrics import top1_agreement
from .ranks import Ranks, images_digest, run_digest
from .reconstruct import RefineResult, _export, _find_layers, _learn_steps
from .simulate import (first_output, insert_activation_quant, insert_constant_quant, layer_inputs, layer_module,
                       unsimulated)
from .views import augment, mix


LOSS_NAMES = {"mse": "mean squared difference from the float model's logits",
              "kl": "KL to the float model"}


# what a QAT step costs per image of its batch, in units of the activations one forward pass of
# the float model makes (every leaf module's output), measured on CPU as the marginal peak
# resident memory between batches of 16 and 48 images over 3 steps (the learned steps as one
# node, freed memory kept): MobileNet v1 0.25 1.13, v1 0.75 1.35, EfficientNet-Lite0 0.94,
# ResNet-20 1.40 (16 and 100 images); over longer runs the peak grows a little (Lite0 at batch 64
# levelled after 62 of 100 steps, 1.19 per image over its 3-step fixed part)
QAT_ACTIVATION_COPIES = 1.5
# The generator's step (qat.data generator or mixed) is counted as a synthesis batch of the model
# plus the generator's saved tensors, ACTIVATION_COPIES (1.75) times both. Measured the same way
# (3 steps, batches of 16 and 48; ResNet-20 64 and 256), with --qat-data generator the peak followed
# the larger of the two steps (per image, counted / measured: MobileNet v1 0.25 78.3 / 78.0 MB, v1
# 0.75 136.7 / 137.0, EfficientNet-Lite0 220 / 151, ResNet-20 7.4 / 7.7 without feature distillation
# and 9.6 with it); with --qat-data mixed, whose two steps take batches of two sizes, it was above
# the larger by about half the smaller (at 48: v1 0.25 2.34 GB above the run's base against 2.50
# counted so and 1.88 for the larger alone, v1 0.75 4.82 against 5.29 and 3.65)


def check_qat_memory(model: LoadedModel, batch_size: int, generated: int = 0, device: str = "auto") -> None:
    """Refuse, with the figures, a QAT batch whose training step would not fit in
    :data:`~dsgonnx.hardware.MEMORY_SHARE` of the memory available on ``device`` (the GPU's
    free memory, else the machine's), before any image is made: instead of an allocation
    failure, or the kernel's kill, minutes into training. ``generated``: how many of the
    batch's images a generator makes each step (``qat.data`` generator or mixed); its own step,
    back through the float model to its images, is counted as synthesis counts a batch
    (:data:`~dsgonnx.synth.generator.ACTIVATION_COPIES` times the model's activations and the
    generator's saved tensors per image), and the larger of the two steps must fit, with half the
    smaller beside it where the two take batches of different sizes (``mixed``)."""
    torch_device = resolve_device(device)
    have = memory_on(torch_device)
    if have is None or None in model.input.chw:
        return
    module = to_torch(model).module.to(torch_device).float().eval()
    per_image = activation_bytes(module, model.input.chw, torch_device, torch.contiguous_format)
    shape = '×'.join(map(str, model.input.chw))
    need = int(QAT_ACTIVATION_COPIES * per_image * batch_size)
    what = f"a batch of {batch_size} images of {shape} needs about {size_text(need)} of memory for a training step"
    if generated:
        own = generator_saved_bytes(model.input.chw, torch_device)
        step = int(ACTIVATION_COPIES * (per_image + own) * generated)
        both = max(need, step) + (min(need, step) // 2 if generated < batch_size else 0)
        what = (f"a batch of {batch_size} images of {shape}, {generated} of them from the generator (its own "
                f"activations {size_text(own)} an image), needs about {size_text(both)} of memory for the "
                "generator's step and the training step")
        need = both
    if need > MEMORY_SHARE * have:
        raise DataError(f"qat: {what} on {torch_device.type}; {size_text(have)} is available there — "
                        "lower `qat.batch_size`")


@dataclass(frozen=True)
class GeneratorSource:
    """What QAT's generator trains against: the float model with its BN statistics (the
    user's file, before BN is folded), the generator's loss (``dsg`` or ``bns``), the model's
    pixel box ``(low, high)`` each ``(1, C, 1, 1)`` (None: a normalised output) and DSG's
    slack settings. ``unit_pixels``: ``model`` is the unit-pixel twin of a model that takes
    pixels 0-255 (:func:`~dsgonnx.graph.onnx_io.unit_pixel_twin`): the generator works on
    the scale of normalised images, as synthesis does, and hands the student pixels."""

    model: LoadedModel
    loss: str = "dsg"
    box: Optional[tuple[np.ndarray, np.ndarray]] = None
    epsilon: float = DEFAULT_EPSILON
    slack_reading: str = DEFAULT_SLACK_READING.value
    unit_pixels: bool = False

    def describe(self) -> dict:
        return {"loss": self.loss, "pixel_box": self.box is not None, "epsilon": self.epsilon,
                "slack_reading": self.slack_reading, **({"unit_pixels": True} if self.unit_pixels else {})}

    def trainer(self, num_outputs: int, batch_size: int, device: torch.device, *, lr: float, bn_weight: float,
                seed: int) -> GeneratorTrainer:
        """A fresh generator and its trainer against this source's model; its batches come out
        in the input space the quantized student takes."""
        box = None if self.box is None else tuple(torch.from_numpy(np.asarray(b, np.float32)) for b in self.box)
        return GeneratorTrainer(to_torch(self.model), num_outputs, batch_size, device, loss=self.loss, lr=lr,
                                bn_weight=bn_weight, epsilon=self.epsilon, slack_reading=self.slack_reading, box=box,
                                seed=seed, to_input=(PIXEL_HALF_RANGE, PIXEL_HALF_RANGE) if self.unit_pixels else None)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float, loss: str = "kl") -> torch.Tensor:
    """``kl``: T²·KL(p_teacher ‖ p_student) of softened logits, averaged over the batch;
    ``mse``: the mean squared difference of the logits."""
    if loss == "mse":
        return F.mse_loss(student, teacher)
    log_p = F.log_softmax(student / temperature, dim=1)
    target = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, target, log_target=True, reduction="batchmean") * temperature**2


class FeatureTaps:
    """The outputs of the trained layers in the teacher and the student, kept while ``on``, for
    feature distillation (``QatConfig.feature_weight``)."""

    def __init__(self, teacher: torch.nn.Module, layers: list):
        self.on = False
        self.teacher: dict[int, torch.Tensor] = {}
        self.student: dict[int, torch.Tensor] = {}
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(teacher.get_submodule(str(layer.fx_node.target)).register_forward_hook(
                self._keep(self.teacher, i)))
            self._handles.append(layer.module.register_forward_hook(self._keep(self.student, i)))

    def _keep(self, store: dict, i: int):
        def hook(module, inputs, output):
            if self.on:
                store[i] = output
        return hook

    def loss(self) -> torch.Tensor:
        """The mean over the layers and samples of each sample's squared difference from the
        teacher's output relative to the teacher output's square (per sample, so that torchrun's
        shares of a batch add up to the whole batch's); the kept outputs are dropped."""
        if set(self.student) != set(self.teacher) or not self.teacher:
            raise RuntimeError("qat: the teacher's and the student's layer outputs were not both recorded")
        terms = []
        for i, t in self.teacher.items():
            t = t.float().flatten(1)
            error = (self.student[i].float().flatten(1) - t).pow(2).sum(1)
            terms.append((error / t.pow(2).sum(1).clamp_min(1e-12)).mean())
        self.teacher.clear()
        self.student.clear()
        return torch.stack(terms).mean()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _correct_start(layers: list, teacher: torch.nn.Module, images: torch.Tensor, chunk: int,
                   device: torch.device) -> int:
    """Start where plain rounding with bias correction is: subtract each layer's expected output
    shift ΔW·E[x] (ΔW: the nearest rounding of the student's weight on its step minus the
    teacher's float weight) from its bias,
    E[x] per input channel measured on the float model over ``images``. Returns how many
    layers were corrected (those with a bias)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    floats: dict[int, torch.Tensor] = {}  # the teacher's weight: the student's may start elsewhere
    hooks = []
    for number, layer in enumerate(layers):
        _, _, inner = layer_module(teacher, str(layer.fx_node.target))
        if inner is None or layer.module.inner.bias is None:
            continue
        floats[number] = inner.weight

        def record(_module, args, number=number):
            x = args[0].detach().double()
            axes = [0] + list(range(2, x.dim()))
            sums[number] = sums.get(number, 0) + x.sum(axes)
            counts[number] = counts.get(number, 0) + x.numel() // x.shape[1]

        hooks.append(inner.register_forward_pre_hook(record))
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            teacher(images[start : start + chunk].to(device))
    for hook in hooks:
        hook.remove()
    for number, total in sums.items():
        quant = layers[number].module
        weight = floats[number].detach().double()
        delta = (quant.nearest_integers().double() * quant.scale.double() - weight).cpu().numpy()
        mean = (total / counts[number]).cpu().numpy()
        shift = conv_shift(delta, mean, mean.size // delta.shape[1]) if delta.ndim > 2 else delta @ mean
        with torch.no_grad():
            quant.inner.bias.sub_(torch.from_numpy(shift).to(quant.inner.bias))
    return len(sums)


def _start_refined(layers: list, quantizers: dict, start: RefineResult) -> tuple[int, int]:
    """Put each layer on the grid reconstruction learned (``start.weights``: its weight step, and
    a float weight of exactly step·integer, so the nearest integers are the learned ones) and each
    activation on its learned step (``start.activations``). Returns (layers moved, activation
    steps moved)."""
    moved = 0
    for layer in layers:
        grid = start.weights.get(layer.weight_name)
        if grid is None:
            continue
        quant = layer.module
        integers = grid.integers.T if layer.transposed else grid.integers
        if tuple(integers.shape) != tuple(quant.inner.weight.shape) or grid.scales.size != quant.scale.numel():
            raise ValueError(f"qat: the reconstruction's grid of {layer.weight_name} does not fit the layer")
        scale = torch.from_numpy(np.asarray(grid.scales, dtype=np.float32)).reshape(quant.scale.shape).to(quant.scale)
        with torch.no_grad():
            quant.scale.copy_(scale)
            quant.inner.weight.copy_(torch.from_numpy(integers).to(quant.inner.weight) * scale)
        moved += 1
    for name, (step, _) in start.activations.items():
        quantizer = quantizers[name]
        quantizer.scale = float(step)
        quantizer.fixed_step.fill_(float(step))
    return moved, len(start.activations)


def _start_squant(layers: list) -> tuple[int, int]:
    """Move each layer's weight so that its nearest integers are SQuant's on the layer's own grid
    (:func:`~dsgonnx.quant.rounding.squant_integers`): the elements SQuant rounds the other way
    are set to their new integer times the step, the rest keep their float value (and so their
    nearest integer). Returns (elements moved, elements)."""
    moved = total = 0
    for layer in layers:
        quant = layer.module
        weight = quant.inner.weight.detach()
        integers = quant.squant_integers()
        flip = integers != quant.nearest_integers()
        with torch.no_grad():
            quant.inner.weight.copy_(torch.where(flip, integers * quant.scale, weight))
        moved += int(flip.sum())
        total += flip.numel()
    return moved, total


def _start_summary(report: dict, moved: tuple[int, int]) -> dict:
    """What a QAT report keeps of the reconstruction it started from."""
    units = report.get("units", [])
    return {"method": report.get("method"), "config": report.get("config"), "seconds": report.get("seconds"),
            "layers": moved[0], "activation_steps": moved[1],
            "loss_before": round(sum(u["loss_before"] for u in units), 6),
            "loss_after": round(sum(u["loss_after"] for u in units), 6),
            "loss_measured_on": report.get("loss_measured_on")}


class _Together:
    """Optimisers stepped as one, each on a cosine schedule to 0 over ``iters`` steps."""

    def __init__(self, optimisers: list, iters: int):
        self.optimisers = optimisers
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(
            o, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, iters) / max(iters, 1)))) for o in optimisers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimiser in self.optimisers:
            optimiser.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimiser, schedule in zip(self.optimisers, self.schedules):
            optimiser.step()
            schedule.step()

    def state_dict(self) -> dict:
        return {"optimisers": [o.state_dict() for o in self.optimisers],
                "schedules": [s.state_dict() for s in self.schedules]}

    def load_state_dict(self, state: dict) -> None:
        for optimiser, saved in zip(self.optimisers, state["optimisers"]):
            optimiser.load_state_dict(saved)
        for schedule, saved in zip(self.schedules, state["schedules"]):
            schedule.load_state_dict(saved)


def _signature(model_path: Path, config: QatConfig, n_images: int, placement: Placement, seed: int,
               data: Optional[dict] = None, start: Optional[dict] = None) -> str:
    """What a checkpoint must have been made from to be resumed: the model, the grids and the
    settings that shape the run (not the time budget, the checkpoint path or resume itself;
    ``start``: the settings of the reconstruction it starts from)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("time_budget", "checkpoint", "resume")}
    return run_digest(model_path, settings, placement, n_images, seed, data, *([start] if start is not None else []))


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a temp file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, str(tmp))
    os.replace(tmp, path)


def qat_model(model_path: Path, output_path: Path, placement: Placement, images: np.ndarray,
              eval_images: Optional[np.ndarray], *, exclude: set[str], per_channel: bool, weight_top: int,
              config: QatConfig, device: str = "auto", seed: int = 0,
              weight_tops: Optional[dict] = None, generator: Optional[GeneratorSource] = None,
              start: Optional[RefineResult] = None) -> RefineResult:
    """Train the quantized simulation of ``model_path`` by distillation on ``images``.

    Arguments as :func:`~.reconstruct.refine_model`'s (``placement``: what the QDQ model
    quantizes, with its calibrated grids, the starting point). ``eval_images`` (else the
    calibration images) measure the distillation loss before and after, without augmentation.
    Writes the float model holding the trained biases and scale·integer weights to
    ``output_path``. ``generator``: train on a generator's fresh images (else on ``images``).
    ``start``: with ``config.start`` ``refine``, the reconstruction of the same model and grids
    to start from.
    """
    if config.start == "auto" or config.feature_weight is None:
        raise ValueError("qat_model takes a resolved start (nearest, squant or refine) and feature weight, got "
                         f"start {config.start!r}, feature_weight {config.feature_weight!r} "
                         "(quantize resolves them: QatConfig.resolved)")
    started = time.perf_counter()
    torch_device = resolve_device(device)
    config = config.for_device(torch_device.type)
    loaded = load_model(model_path)
    teacher = to_torch(loaded).module.to(torch_device).float().eval()
    student_model = to_torch(loaded)
    onnx_model = student_model.graph
    layers, skipped = _find_layers(student_model, onnx_model, placement, exclude, weight_top, per_channel,
                                   True, weight_tops or {})
    if not layers:
        raise UnsupportedModelError("qat: the model has no Conv/Gemm/MatMul layer to train")
    quantizers, missing = insert_activation_quant(student_model, placement.activations)
    if (config.start == "refine") != (start is not None):
        raise ValueError("qat: start 'refine' needs the reconstruction to start from (and only it takes one)")
    refined_start = _start_refined(layers, quantizers, start) if start is not None else None
    for layer in layers:
        if layer.input_name in quantizers:
            layer.module.quantize_bias_on(quantizers[layer.input_name])
    _, simulated = insert_constant_quant(student_model, placement, layer_inputs(layers), quantizers)
    learned = _learn_steps(quantizers, placement) if config.act_lr > 0 else {}
    student = student_model.module.to(torch_device).float()
    for parameter in list(student.parameters()) + list(teacher.parameters()):
        parameter.requires_grad_(False)
    weights, steps = [], []
    for layer in layers:
        layer.module.mode = "train"
        weights.append(layer.module.inner.weight)
        if layer.module.inner.bias is not None:
            weights.append(layer.module.inner.bias)
        if config.weight_step_lr > 0:
            steps.append(layer.module.learn_scale())
    act_steps = list({id(q.log_step): q.log_step for q in learned.values()}.values())
    for parameter in weights + steps + act_steps:
        parameter.requires_grad_(True)
    groups = [{"params": steps, "lr": config.weight_step_lr}] if steps else []
    if act_steps:
        groups.append({"params": act_steps, "lr": config.act_lr})
    if config.optimizer == "sgd":  # the weights on SGD (the data-free QAT papers'), the steps on Adam
        optimisers = [torch.optim.SGD(weights, lr=config.lr, momentum=0.9, nesterov=True)]
        optimisers += [torch.optim.Adam(groups)] if groups else []
    else:
        optimisers = [torch.optim.Adam([{"params": weights, "lr": config.lr}] + groups)]
    optimiser = _Together(optimisers, config.iters)

    world = distributed.world()
    ranks = None
    if world is not None and world.size > 1:
        if generator is not None:
            raise DataError(f"qat: --qat-data {config.data} trains one generator step by step with the student and "
                            "does not split over torchrun's ranks; run it in one process, or train on the "
                            "calibration images (--qat-data calib)")
        ranks = Ranks(world, weights + steps + act_steps, min(config.batch_size, len(images)), "qat", "--qat-batch-size")
    calib = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    chunk = max(config.batch_size, 64)
    moved = _start_squant(layers) if config.start == "squant" else None
    corrected = _correct_start(layers, teacher, calib, chunk, torch_device)
    held = (np.asarray(eval_images, dtype=np.float32) if eval_images is not None and len(eval_images)
            else np.asarray(images, dtype=np.float32))
    teacher_held = first_output(teacher, held, chunk, torch_device)

    def held_loss() -> tuple[float, float]:
        student.eval()
        out = first_output(student, held, chunk, torch_device).reshape(len(held), -1)
        target = teacher_held.reshape(len(held), -1)
        loss = distillation(torch.from_numpy(out), torch.from_numpy(target), config.temperature, config.loss)
        return float(loss), top1_agreement(target, out)

    trainer = None
    if generator is not None:
        trainer = generator.trainer(int(np.prod(teacher_held.shape[1:])), config.batches(len(calib))[1],
                                    torch_device, lr=config.generator_lr, bn_weight=config.bn_weight, seed=seed)
    batches = torch.Generator().manual_seed(seed)
    step = 0
    checkpoint = Path(config.checkpoint) if config.checkpoint else None
    signature = _signature(model_path, config, len(calib), placement, seed,
                           generator.describe() if generator is not None else None,
                           start.report.get("config") if start is not None else None)
    resumed_from = None
    if ranks is not None:  # the same model, grids, settings and images on every rank
        distributed.agree("the QAT model, grids, settings and calibration images", (signature, images_digest(images)))

    def read_checkpoint() -> Optional[dict]:
        """The checkpoint to resume from (rank 0 reads it; every rank gets it), or None."""
        if not (config.resume and checkpoint is not None and distributed.is_writer()):
            return None
        if not checkpoint.exists():  # the first of repeated runs (README: --qat-resume)
            say(f"qat: no checkpoint at {checkpoint} yet; training from the start")
            return None
        try:
            state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DataError(f"qat: cannot read checkpoint {checkpoint}: {error}") from None
        if not isinstance(state, dict) or state.get("signature") != signature:
            raise DataError(f"qat: checkpoint {checkpoint} was made for another model, data or settings; "
                            "remove it or drop --qat-resume")
        return state

    state = distributed.together(read_checkpoint)
    if ranks is not None:
        state = distributed.exchange(state)[0]
    if state is not None:
        with torch.no_grad():
            for parameter, value in zip(weights + steps + act_steps, state["parameters"]):
                parameter.copy_(value)
        optimiser.load_state_dict(state["optimiser"])
        batches.set_state(state["batches"])
        if trainer is not None:
            trainer.load_state_dict(state["generator"])
        step = resumed_from = int(state["step"])
        say(f"qat: resumed from {checkpoint} at step {step}/{config.iters}")

    before, agreed_before = held_loss()
    data = ("calibration images" if trainer is None else
            "generator and calibration images" if config.data == "mixed" else "generator")
    source = (f"{len(calib)} images" if trainer is None else f"a {generator.loss} generator's fresh images"
              + (f" and {len(calib)} images" if config.data == "mixed" else ""))
    say(f"qat: {len(layers)} layers, {len(quantizers)} quantized activations, {config.iters} steps of batch "
        f"{config.batch_size} on {source}, on {torch_device}, from {config.start} rounding"
        + (f" ({moved[0]} of {moved[1]} weights rounded the other way)" if moved is not None else "")
        + f"; held-out {config.loss} {before:.4g}, top-1 agreement {agreed_before:.3f}")
    stopped = "done"
    losses = []
    batch = min(config.batch_size - (trainer.batch_size if trainer is not None else 0), len(calib))
    train_started = time.perf_counter()

    def over_budget() -> bool:
        return config.time_budget is not None and time.perf_counter() - train_started > config.time_budget

    # the same tensors step after step, like reconstruction's units (hardware.freed_memory_kept)
    with freed_memory_kept() as kept:
        warmup = 0
        if trainer is not None and step == 0 and config.generator_warmup:
            progress = Progress("qat generator warm-up", config.generator_warmup)
            while trainer.steps < config.generator_warmup and not over_budget():
                trainer.step()
                warmup += 1
                if trainer.steps % 10 == 0:
                    progress.update(trainer.steps, " ".join(f"{k} {v:.3g}" for k, v in trainer.last.items()))
            progress.close()
        progress = Progress("qat", config.iters)
        taps = FeatureTaps(teacher, layers) if config.feature_weight > 0 else None

        def save() -> None:
            if not distributed.is_writer():
                return
            _save_checkpoint(checkpoint, {"signature": signature, "step": step,
                                          "parameters": [p.detach() for p in weights + steps + act_steps],
                                          "optimiser": optimiser.state_dict(),
                                          "batches": batches.get_state(),
                                          **({"generator": trainer.state_dict()} if trainer is not None else {})})

        while step < config.iters:
            if ranks is None and over_budget():
                stopped = "time budget"
                if checkpoint is not None:  # a later --qat-resume continues where the budget stopped it
                    save()
                break
            student.train()
            drawn_from = batches.get_state() if ranks is not None else None
            parts = [trainer.step()] if trainer is not None else []
            if batch > 0:
                index = torch.randint(len(calib), (batch,), generator=batches)
                x = calib[index]
                if config.augment:
                    x = augment(x, batches)
                x = mix(x, batches, config.mix)
                if ranks is not None:  # the whole batch drawn and augmented on every rank, each trains on its share
                    x = ranks.share(x)
                x = x.to(torch_device)
                with torch.no_grad():
                    if taps is not None:
                        taps.on = trainer is None  # else the teacher's layers are read below, on the whole batch
                    parts.append((x, logits(teacher(x))))
            x = torch.cat([part[0] for part in parts]) if len(parts) > 1 else parts[0][0]
            target = torch.cat([part[1] for part in parts]) if len(parts) > 1 else parts[0][1]
            if taps is not None:
                taps.on = True
                if trainer is not None:  # the generator's images in the batch: the teacher's layers run again on all
                    with torch.no_grad():
                        teacher(x)
            loss = distillation(logits(student(x)), target, config.temperature, config.loss)
            if taps is not None:
                taps.on = False
                features = taps.loss()
                loss = loss + config.feature_weight * features
            failed = not bool(torch.isfinite(loss))
            if ranks is not None:
                loss = loss * ranks.weight(len(x))  # this rank's part of the whole batch's loss
            optimiser.zero_grad(set_to_none=True)
            if not failed:
                loss.backward()
            value = loss.detach()
            if ranks is not None:
                value, failed, stop = ranks.reduce(float(value), failed, over_budget())
                if stop and not failed:  # this step is not taken: a resumed run draws its batch again
                    stopped = "time budget"
                    batches.set_state(drawn_from)
                    if checkpoint is not None:
                        save()
                    break
            if failed:
                term = ("feature distillation" if taps is not None and not bool(torch.isfinite(features))
                        else LOSS_NAMES[config.loss])
                raise DataError(f"qat: the distillation loss ({term}) became "
                                f"{float(value) if ranks is None else 'non-finite on a rank'} at step {step + 1}; "
                                "lower --qat-lr")
            optimiser.step()
            step += 1
            if step % 10 == 0 or step == config.iters:
                losses.append(float(value))
                progress.update(step, f"{config.loss} {losses[-1]:.4g}" + (f" ce {trainer.last['cross_entropy']:.3g}"
                                                                 if trainer is not None else "")
                                + (f" features {float(features.detach()):.4g}" if taps is not None else ""))
            if checkpoint is not None and (step % config.checkpoint_every == 0 or step == config.iters):
                save()
        progress.close()
    if taps is not None:
        taps.close()
    if trainer is not None:
        trainer.close()
    train_seconds = time.perf_counter() - train_started
    for layer in layers:
        layer.module.fix_scale()
        layer.module.mode = "nearest"  # the exported integers: nearest on the trained weight and step
    student.eval()
    after, agreed_after = held_loss()
    for parameter in weights + act_steps:
        parameter.requires_grad_(False)
    refined = _export(layers, model_path, output_path, biases=True)
    activations = {name: (float(q.step().detach().cpu()), q.zero_point) for name, q in learned.items()}
    seconds = round(time.perf_counter() - started, 2)
    done_steps = step - (resumed_from or 0)
    report = {"method": "qat", "config": config.to_dict(), "device": str(torch_device), "seconds": seconds,
              "steps": step, "stopped": stopped, "resumed_from": resumed_from,
              "steps_per_second": round(done_steps / train_seconds, 3) if train_seconds > 0 and done_steps else None,
              "freed_memory_kept": kept,
              "calibration_samples": len(calib), "bias_corrected_start": corrected,
              "start": {"rounding": config.start,
                        **({"rounded_other_way": moved[0], "values": moved[1]} if moved is not None else {}),
                        **({"reconstruction": _start_summary(start.report, refined_start)} if start is not None else {})},
              "data": data,
              **({"generator": {**generator.describe(), "lr": config.generator_lr, "bn_weight": config.bn_weight,
                                "warmup_steps": warmup, "steps": trainer.steps,
                                "last_terms": {k: round(v, 6) for k, v in trainer.last.items()}}}
                 if trainer is not None else {}),
              "loss_measured_on": "held-out samples" if eval_images is not None and len(eval_images) else
              "the calibration samples",
              "loss": config.loss,
              "distillation_before": round(before, 6), "distillation_after": round(after, 6),
              "agreement_before": round(agreed_before, 4), "agreement_after": round(agreed_after, 4),
              "train_loss_start": [round(v, 6) for v in losses[:5]],
              "train_loss": [round(v, 6) for v in losses[-5:]],
              "refined_layers": [layer.onnx_name for layer in layers], "skipped_layers": skipped,
              "simulated_activations": len(quantizers),
              "unsimulated": unsimulated(placement, missing, layer_inputs(layers) | simulated),
              "learned_activation_steps": {name: {"calibrated": quantizers[name].scale, "learned": scale}
                                           for name, (scale, _) in activations.items()}}
    say(f"qat: {stopped} after {step} steps in {seconds:.1f}s; held-out {config.loss} {before:.4g} -> {after:.4g}, "
        f"top-1 agreement with the float model {agreed_before:.3f} -> {agreed_after:.3f}")
    return RefineResult(path=output_path, weights=refined, report=report, activations=activations,
                        simulation=lambda x: first_output(student, x, chunk, torch_device))
