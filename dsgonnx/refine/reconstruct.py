"""Reconstruction PTQ on calibration images: AdaRound layer by layer, BRECQ block by block.

Works on the model ONNX Runtime is about to quantize (after its pre-processing, BN folded),
converted to torch, with every tensor the exported QDQ model quantizes fake-quantized on its
exported grid (:mod:`.simulate`: the model input, layer inputs and outputs, both inputs of
each residual Add, pooled features, ... as read from a plain QDQ model of the same float
model), and every other constant it quantizes (a LayerNormalization's scale, an Add's
constant, ...) on its exported values. Units (layers or blocks, :mod:`.blocks`) are processed
in graph order. Each unit sees two streams of its inputs: the float model's (whose unit
outputs are the targets) and the already-quantized prefix's (what the unit will really
receive). Its weight roundings are learned to minimise

    ‖unit_q(x_q) − unit_fp(x_fp)‖² + λ · Σ (1 − |2h − 1|^β)

(plus, with ``prediction_weight``, PD-Quant's prediction difference: :class:`_Prediction`)
with β annealed from 20 to 2 after a warm-up (Nagel et al. 2020; Li et al. 2021), while the
unit's activations are fake-quantized (optionally with QDrop's random dropping of that
quantization while training). The learned integers and scales come back per ONNX weight so
that the QDQ model holds exactly them; the trained simulation stays available to compare
with the exported model (:func:`.simulate.fidelity`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from .. import distributed, hardware
from ..config import RefineConfig, RefineMethod
from ..errors import DataError, UnsupportedModelError
from ..graph.onnx_io import load_model
from ..graph.to_torch import resolve_device, to_torch
from ..hardware import check_image_memory, freed_memory_kept
from ..progress import Progress, say
from ..quant.placement import Placement
from ..quant.qdq import quantized_weights
from .blocks import Unit, Whole, concat, join_nodes, mark_whole, partition, read_from_outside, run_unit, take, tensors
from .quantizers import ActQuant, QuantLayer, choose, random_mask, weight_scales
from .ranks import Ranks, images_digest, run_digest
from .simulate import (first_output, insert_activation_quant, insert_constant_quant, layer_inputs, layer_module,
                       unsimulated)
from .views import with_views


@dataclass
class RefinedWeight:
    """One ONNX weight's learned grid, in the ONNX tensor's layout."""

    integers: np.ndarray  # int64, values in [-top, top]
    scales: np.ndarray  # float32, one per channel (or one)
    axis: Optional[int]  # ONNX axis of the scales, None for per-tensor


@dataclass
class RefineResult:
    path: Path  # the model with refined float weights (= scale · integer)
    weights: dict[str, RefinedWeight]  # ONNX initializer name -> learned grid
    report: dict
    activations: dict = field(default_factory=dict)  # tensor -> learned (scale, zero point), with act_lr > 0
    simulation: Optional[Callable[[np.ndarray], np.ndarray]] = None  # the trained simulation's first output

    def release(self) -> None:
        """Drop the trained simulation (it holds the torch model)."""
        self.simulation = None


@dataclass
class _Layer:
    onnx_name: str
    weight_name: str
    input_name: str  # the ONNX tensor the layer reads
    onnx_axis: Optional[int]
    transposed: bool  # ONNX weight is the transpose of the torch one (WeightSite.transposed)
    fx_node: object
    module: QuantLayer


def _find_layers(torch_model, onnx_model: onnx.ModelProto, placement: Placement, exclude: set[str], weight_top: int,
                 per_channel: bool, scale_search: bool, weight_tops: dict) -> tuple[list[_Layer], list[dict]]:
    """Wrap every Conv/Gemm/MatMul weight ORT will quantize in a QuantLayer (on the grid of
    ``weight_tops[weight]``, else ``weight_top``; its bias on the int32 grid of its input's
    scale); list what is skipped and why."""
    uses: dict[str, int] = {}
    for node in onnx_model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    module = torch_model.module
    fx_by_target = {str(n.target): n for n in module.graph.nodes if n.op == "call_module"}
    layers, skipped = [], []
    for site in quantized_weights(onnx_model):
        node = site.node
        if node.name in exclude:
            skipped.append({"layer": node.name, "why": "excluded (kept float)"})
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            skipped.append({"layer": node.name, "why": f"{node.op_type} weights are not refined (plain rounding)"})
            continue
        if site.axis is None:  # a MatMul by a stack of matrices
            skipped.append({"layer": node.name, "why": "MatMul by a weight of more than 2 dimensions is not refined "
                                                       "(plain rounding)"})
            continue
        if uses.get(site.weight, 0) > 1:
            skipped.append({"layer": node.name, "why": "weight shared with another node"})
            continue
        target = torch_model.module_names.get(node.name)
        parent, attr, inner = layer_module(module, target)
        if inner is None or target not in fx_by_target:
            kind = type(module.get_submodule(target)).__name__ if target else "nothing"
            skipped.append({"layer": node.name, "why": f"converted to {kind}, not a Conv/Linear module"})
            continue
        onnx_axis = site.axis if per_channel else None
        top = weight_tops.get(site.weight, weight_top)
        scales = weight_scales(inner.weight, top, 0 if per_channel else None, search=scale_search)
        wrapped = QuantLayer(inner, scales, top, 0 if per_channel else None)
        setattr(parent, attr, wrapped)
        layers.append(_Layer(node.name, site.weight, node.input[0], onnx_axis, site.transposed, fx_by_target[target],
                             wrapped))
    return layers, skipped


def _loss(outputs: list, targets: list) -> torch.Tensor:
    """Squared error summed over channels, averaged over samples and positions (BRECQ's)."""
    total = 0.0
    for out, tgt in zip(outputs, targets):
        for o, t in zip(tensors(out), tensors(tgt)):
            diff = (o - t).float().pow(2)
            total = total + (diff.sum(1).mean() if diff.dim() > 1 else diff.mean())
    return total


def _run_rows(module, unit: Unit, inputs: list, rows: slice, batch: int) -> list:
    """The unit's outputs for ``rows`` of its inputs, computed in chunks without grad."""
    index = torch.arange(rows.start, rows.stop)
    parts = []
    with torch.no_grad():
        for start in range(0, len(index), batch):
            chunk = index[start : start + batch]
            outputs = run_unit(module, unit, [take(v, chunk) for v in inputs])
            parts.append([Whole(v) if n in unit.whole else v for n, v in zip(unit.outputs, outputs)])
    return [concat([p[i] for p in parts]) for i in range(len(unit.outputs))]


def _mixed(quantized, fp, prob: float, generator: torch.Generator):
    """QDrop's unit input: each element the float model's with probability ``prob``, else the
    quantized prefix's (values that are not float tensors of one shape stay quantized); ``prob``
    to the nearest 1/256 (:func:`random_mask`)."""
    if (not isinstance(quantized, torch.Tensor) or not isinstance(fp, torch.Tensor)
            or not quantized.is_floating_point() or quantized.shape != fp.shape):
        return quantized
    return choose(random_mask(quantized.shape, prob, generator, quantized.device), fp, quantized)


def _beta(step: int, total: int, config: RefineConfig) -> Optional[float]:
    start = config.warmup * total
    if step < start:
        return None
    progress = (step - start) / max(total - start, 1)
    return config.beta_end + (config.beta_start - config.beta_end) * max(0.0, 1.0 - progress)


class _Prediction:
    """PD-Quant's prediction difference (Liu et al. 2023): a unit's quantized output run through
    the rest of the network in float, scored against the float model's output by
    KL(softmax(z_fp / T) ‖ softmax(z / T)), averaged over the samples and weighted
    (``RefineConfig.prediction_weight``). The rest reads the quantized prefix's values where it
    reads tensors from before the unit (residual skips). An output of probabilities is compared
    through its logarithm, a one-column output as two classes (as :mod:`dsgonnx.validation.metrics`
    reads it)."""

    def __init__(self, module, units: list[Unit], rows: torch.Tensor, config: RefineConfig, chunk: int,
                 device: torch.device):
        from ..validation.metrics import binary_head, looks_like_probabilities

        self.module, self.units, self.weight, self.temperature = module, units, config.prediction_weight, \
            config.prediction_temperature
        node = next(n for n in module.graph.nodes if n.op == "output").args[0]
        while isinstance(node, (tuple, list)):
            node = node[0]
        self.output = node
        fp = first_output(module, rows.numpy(), chunk, device)  # every layer float: no unit reached yet
        fp = fp.reshape(len(fp), -1)
        self.kind = binary_head(fp) or ("probabilities" if looks_like_probabilities(fp) else "logits")
        self.target = F.log_softmax(self.logits(torch.from_numpy(fp).to(device)) / self.temperature, dim=1)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(len(out), -1).float()
        tiny = torch.finfo(torch.float32).tiny
        if self.kind == "probabilities":
            return out.clamp(min=tiny).log()
        if self.kind == "binary probability":
            p = out.clamp(tiny, 1 - 1e-7)
            return torch.cat([(1 - p).log(), p.log()], dim=1)
        if self.kind == "binary logit":
            return torch.cat([torch.zeros_like(out), out], dim=1)
        return out

    def after(self, unit: Unit, env: dict) -> "_Tail":
        """The term for ``unit``: the nodes after it up to the model's output, run on its outputs
        and on the values of ``env`` (every value computed before it, all rows) they read."""
        later = self.units[next(i for i, u in enumerate(self.units) if u is unit) + 1:]
        nodes = [n for u in later for n in u.nodes]
        inputs = read_from_outside(nodes) if self.output in nodes else [self.output]  # else the unit computes it
        return _Tail(self, unit, Unit(nodes=nodes, layers=[], inputs=inputs, outputs=[self.output]), env)


@dataclass
class _Tail:
    """:class:`_Prediction`'s term for one unit (:meth:`_Prediction.after`)."""

    prediction: _Prediction
    unit: Unit
    rest: Unit
    env: dict

    def loss(self, outputs: list, index: torch.Tensor) -> torch.Tensor:
        """The weighted KL for rows ``index``, ``outputs`` the unit's on them."""
        outs, p = self.unit.outputs, self.prediction
        values = [outputs[outs.index(n)] if n in outs else take(self.env[n], index) for n in self.rest.inputs]
        z = p.logits(run_unit(p.module, self.rest, values)[0])
        return p.weight * F.kl_div(F.log_softmax(z / p.temperature, dim=1), take(p.target, index),
                                   log_target=True, reduction="batchmean")


def refine_model(model_path: Path, output_path: Path, placement: Placement, images: np.ndarray,
                 eval_images: Optional[np.ndarray], *, exclude: set[str], per_channel: bool, weight_top: int,
                 config: RefineConfig, device: str = "auto", seed: int = 0,
                 weight_tops: Optional[dict] = None, input_means: Optional[dict] = None,
                 written_means: Optional[dict] = None) -> RefineResult:
    """Learn the weight rounding of ``model_path`` (an fp32 ONNX model ORT will quantize).

    ``placement``: what the QDQ model of ``model_path`` quantizes, read from one ORT wrote
    (:func:`dsgonnx.quant.placement.read_placement`); its activations are simulated on their
    grids. ``weight_tops``: weight name -> largest integer, for weights on another grid than
    ``weight_top``'s (the first layer at 8 bits). ``eval_images`` (else the calibration
    images) measure each unit's reconstruction loss before and after. ``input_means``: layer
    (ONNX node name) -> E[x] per input channel, the means bias correction will use; with
    ``config.correct_inside`` each refined layer that has one is simulated corrected
    (:meth:`QuantLayer.correct_for`); ``written_means`` (where the correction written uses other
    means): the simulation returned holds those instead, so that it is the corrected file.
    Writes the refined model to ``output_path`` (its biases as they were: the correction is
    applied to the QDQ model, as without ``correct_inside``).
    """
    if config.start not in ("nearest", "squant"):
        raise ValueError(f"refine_model starts from nearest or squant rounding, got {config.start!r} "
                         "(quantize resolves 'auto': RefineConfig.resolved)")
    if config.weight_step_lr is None:
        raise ValueError("refine_model needs `weight_step_lr` resolved (quantize resolves it by the calibration "
                         "images: RefineConfig.resolved)")
    started = time.perf_counter()
    torch_device = resolve_device(device)
    config = config.for_device(torch_device.type)
    loaded = load_model(model_path)
    torch_model = to_torch(loaded)
    for parameter in torch_model.module.parameters():  # the float model's own stay fixed: the roundings,
        parameter.requires_grad_(False)  # steps, learn (their parameters are made below, trainable)
    onnx_model = torch_model.graph
    layers, skipped = _find_layers(torch_model, onnx_model, placement, exclude, weight_top, per_channel, config.scale_search,
                                   weight_tops or {})
    if not layers:
        raise UnsupportedModelError("refine: the model has no Conv/Gemm/MatMul layer to refine")
    quantizers, missing = insert_activation_quant(torch_model, placement.activations)
    for layer in layers:
        if layer.input_name in quantizers:  # ORT quantizes the bias on the input's scale times the weight's
            layer.module.quantize_bias_on(quantizers[layer.input_name])
    constants, simulated = insert_constant_quant(torch_model, placement, layer_inputs(layers), quantizers)
    for quantizer in [*quantizers.values(), *(q for qs in constants.values() for q in qs)]:
        quantizer.enabled = False  # each unit turns its own on once its float targets are computed
    learned = _learn_steps(quantizers, placement) if config.act_lr > 0 else {}
    inside = bool(config.correct_inside)  # None (unresolved): as quantize resolves it without bias correction
    if inside and input_means is None:
        raise ValueError("refine_model: `correct_inside` needs the layers' input means (input_means)")
    corrected = [layer.onnx_name for layer in layers if inside and layer.onnx_name in input_means]
    for layer in layers:
        if layer.onnx_name in corrected:
            layer.module.correct_for(input_means[layer.onnx_name])
    module = torch_model.module.to(torch_device).float().eval()
    op_types = _op_types(torch_model)
    by_node = {layer.fx_node: layer for layer in layers}
    acts = {n: module.get_submodule(n.target) for n in module.graph.nodes
            if n.op == "call_module" and isinstance(module.get_submodule(n.target), ActQuant)}
    units = partition(module, set(by_node), join_nodes(module, op_types), config.method, config.block_layers)
    trained = [u for u in units if u.layers]

    if config.views > 1:  # the views are held, and run through every unit, beside the images
        check_image_memory(len(images) * config.views, np.shape(images)[1:], "num_samples × refine.views")
    calib = with_views(torch.from_numpy(np.asarray(images, dtype=np.float32)), config.views, seed)
    held = torch.from_numpy(np.asarray(eval_images, dtype=np.float32)) if eval_images is not None and len(eval_images) else None
    rows = torch.cat([calib, held]) if held is not None else calib
    _check_held_memory(module, units, tuple(rows.shape[1:]), len(rows), torch_device, held is not None)
    mark_whole(module, units, tuple(rows.shape[1:]), torch_device)
    world = distributed.world()
    world = world if world is not None and world.size > 1 else None
    if world is not None:  # the same model, grids, settings and images on every rank
        distributed.agree("the model, grids, refine settings and calibration images",
                          (run_digest(model_path, config.to_dict(), placement, seed), images_digest(rows.numpy())))
    run = _Reconstruction(module, by_node, config, torch_device, n_train=len(calib),
                          eval_rows=slice(len(calib), len(rows)) if held is not None else slice(0, len(calib)),
                          chunk=max(config.batch_size, 64), units=len(trained), seed=seed, world=world)
    prediction = _Prediction(module, units, rows, config, run.chunk, torch_device) if config.prediction_weight > 0 else None
    placeholder = next(n for n in module.graph.nodes if n.op == "placeholder")
    fp_env = {placeholder: rows.to(torch_device)}
    q_env = {placeholder: fp_env[placeholder]}
    say(f"refine: {config.method}, {len(layers)} layers in {len(trained)} "
        f"{'blocks' if config.method == RefineMethod.BRECQ else 'layers'}, {len(quantizers)} quantized activations, "
        f"{config.iters} iterations each, {run.n_train} calibration samples, on {torch_device}"
        + (f", each batch shared by {world.size} ranks" if world is not None else ""))
    report_units = []  # every QuantLayer starts in "fp" mode until its unit is reached
    done: set = set()
    everything = slice(0, len(rows))
    with freed_memory_kept() as kept:  # (the same tensors, unit after unit: see hardware)
        for unit in units:
            fp_in = [fp_env[n] for n in unit.inputs]
            q_in = [q_env[n] for n in unit.inputs]
            targets = _run_rows(module, unit, fp_in, everything, run.chunk)
            unit_acts = [acts[n] for n in unit.nodes if n in acts]
            unit_constants = [q for n in unit.nodes for q in constants.get(n, [])]
            for quantizer in unit_acts + unit_constants:
                quantizer.enabled = True
            if unit.layers:
                tail = None if prediction is None else prediction.after(unit, q_env)
                report_units.append(run.reconstruct(unit, q_in, targets, unit_acts, fp_in, tail))
                q_out = _run_rows(module, unit, q_in, everything, run.chunk)
            else:
                same = not unit_acts and not unit_constants and all(a is b for a, b in zip(fp_in, q_in))
                q_out = targets if same else _run_rows(module, unit, q_in, everything, run.chunk)
            for node, fp_value, q_value in zip(unit.outputs, targets, q_out):
                fp_env[node], q_env[node] = fp_value, q_value
            done.update(unit.nodes)
            for env in (fp_env, q_env):
                _release(env, done)
    if written_means is not None:  # the simulation of the file: the correction with the means written
        for layer in layers:
            if layer.onnx_name in corrected and layer.onnx_name in written_means:
                layer.module.correct_for(written_means[layer.onnx_name])
    weights = _export(layers, model_path, output_path)
    activations = {name: (float(q.step().detach().cpu()), q.zero_point) for name, q in learned.items()}
    seconds = round(time.perf_counter() - started, 2)
    report = {"method": config.method.value, "config": config.to_dict(), "device": str(torch_device),
              "seconds": seconds, "calibration_samples": run.n_train, "ranks": world.size if world is not None else 1,
              "loss_measured_on": "held-out samples" if held is not None else "the calibration samples",
              "held_out_samples": len(rows) - run.n_train if held is not None else 0,
              "refined_layers": [layer.onnx_name for layer in layers], "skipped_layers": skipped,
              "corrected_inside": len(corrected),
              "freed_memory_kept": kept,
              "simulated_activations": len(quantizers),
              "unsimulated": unsimulated(placement, missing, layer_inputs(layers) | simulated),
              "learned_activation_steps": {name: {"calibrated": quantizers[name].scale, "learned": scale}
                                           for name, (scale, _) in activations.items()},
              "units": report_units}
    say(f"refine: done in {seconds:.1f}s; reconstruction loss "
        f"{sum(u['loss_before'] for u in report_units):.4g} -> {sum(u['loss_after'] for u in report_units):.4g} "
        f"(sum over {len(report_units)} units, {report['loss_measured_on']})")
    return RefineResult(path=output_path, weights=weights, report=report, activations=activations,
                        simulation=lambda x: first_output(module, x, run.chunk, torch_device))


def _op_types(torch_model) -> dict[str, str]:
    """Torch submodule name -> the ONNX op type it was converted from."""
    return {torch_model.module_names[n.name]: n.op_type for n in torch_model.graph.graph.node
            if n.name in torch_model.module_names}


def held_bytes_per_sample(module, units: list[Unit], chw: tuple, device: torch.device, held_out: bool) -> int:
    """Bytes of activations reconstruction holds per sample at its peak: while a unit is
    reconstructed, the images and every tensor later units still read, in the float and the
    quantized stream, and the unit's outputs twice (the float targets, the quantized outputs),
    three times where its loss is evaluated on the calibration samples (no ``held_out`` ones).
    Sized by running one zero sample through the units, as reconstruction does."""
    placeholder = next(n for n in module.graph.nodes if n.op == "placeholder")
    env = {placeholder: torch.zeros((1, *chw), device=device)}
    done: set = set()
    peak = 0

    def size(value) -> int:
        return sum(t.numel() * t.element_size() for t in tensors(value))

    with torch.no_grad():
        for unit in units:
            outputs = run_unit(module, unit, [env[n] for n in unit.inputs])
            streams = sum((1 if node is placeholder else 2) * size(value) for node, value in env.items())
            peak = max(peak, streams + (2 if held_out else 3) * sum(size(v) for v in outputs))
            env.update(zip(unit.outputs, outputs))
            done.update(unit.nodes)
            _release(env, done)
    return peak


def _release(env: dict, done: set) -> None:
    """Drop from ``env`` the values no node still to run (outside ``done``) reads."""
    for node in [n for n in env if all(u in done for u in n.users)]:
        del env[node]


def _check_held_memory(module, units: list[Unit], chw: tuple, samples: int, device: torch.device,
                       held_out: bool) -> None:
    """Refuse, with the figures, samples whose activations reconstruction could not hold in
    :data:`dsgonnx.hardware.MEMORY_SHARE` of the memory available on ``device`` (the GPU's free
    memory, else the machine's), instead of an allocation failure or the kernel's kill minutes later."""
    have = hardware.memory_on(device)
    if have is None:
        return
    need = held_bytes_per_sample(module, units, chw, device, held_out) * samples
    if need > hardware.MEMORY_SHARE * have:
        raise DataError(f"refine: {samples} samples (with any views and held-out ones) of {'×'.join(map(str, chw))} "
                        f"hold about {hardware.size_text(need)} of activations while the blocks are reconstructed on "
                        f"{device.type}; {hardware.size_text(have)} is available there — ask for fewer (`num_samples`)")


def check_memory_before(model, samples: int, held_out: bool, config: RefineConfig, device: str = "auto") -> None:
    """:func:`refine_model`'s memory check, made before the calibration images are: ``model`` (a
    :class:`~dsgonnx.graph.onnx_io.LoadedModel`, the float model quantize starts from) sized
    by the same one-sample run through the same partition of its torch twin, whose Conv/Gemm/MatMul
    layers not yet wrapped and activations not yet quantized change no tensor's size. So a
    set reconstruction would refuse is refused before the synthesis's minutes, not after."""
    torch_device = resolve_device(device)
    torch_model = to_torch(model)
    module = torch_model.module.to(torch_device).float().eval()
    op_types = _op_types(torch_model)
    layers = {n for n in module.graph.nodes
              if n.op == "call_module" and (op_types.get(str(n.target)) in ("Conv", "Gemm")
                                            or isinstance(module.get_submodule(n.target), nn.Linear))}
    units = partition(module, layers, join_nodes(module, op_types), config.method, config.block_layers)
    _check_held_memory(module, units, tuple(model.input.chw), samples, torch_device, held_out)


def _learn_steps(quantizers: dict[str, ActQuant], placement: Placement) -> dict[str, ActQuant]:
    """Make the activation steps learnable, one parameter per grid ORT writes (the tensors it
    puts on another's grid share it); returns the tensor each grid is exported under."""
    groups: dict[str, list[str]] = {}
    for name in quantizers:
        groups.setdefault(placement.activations[name].group or name, []).append(name)
    roots = {}
    for group, names in groups.items():
        root = next((name for name in names if group == f"{name}_scale"), names[0])  # ORT names it after its tensor
        parameter = quantizers[root].learn_step()
        for name in names:
            if name != root:
                quantizers[name].share_step(parameter)
        roots[root] = quantizers[root]
    return roots


class _Reconstruction:
    """The state shared by every unit's optimisation: the module, its quantized layers, the
    settings (iterations resolved for the device), the sample split and the generators —
    one for the mini-batches (CPU), one for QDrop (on the device), both from ``seed`` (under
    torchrun, ``world``: the same batches on every rank, QDrop's draws offset by the rank)."""

    def __init__(self, module, by_node: dict, config: RefineConfig, device: torch.device, *, n_train: int,
                 eval_rows: slice, chunk: int, units: int, seed: int, world=None):
        self.module, self.by_node, self.config, self.device, self.world = module, by_node, config, device, world
        self.n_train, self.eval_rows, self.chunk, self.units = n_train, eval_rows, chunk, units
        self.batches = torch.Generator().manual_seed(seed)
        self.trained_steps: set[int] = set()  # a shared step is learned in the first unit that uses it
        # QDrop's draws: a stream of its own on each rank (the ranks hold different samples)
        self.drops = torch.Generator(device=device).manual_seed(seed + (world.rank if world is not None else 0) * 1_000_003)
        self.number = 0

    def _eval_loss(self, unit: Unit, q_in: list, targets: list) -> float:
        outputs = _run_rows(self.module, unit, q_in, self.eval_rows, self.chunk)
        index = torch.arange(self.eval_rows.start, self.eval_rows.stop)
        with torch.no_grad():
            return float(_loss(outputs, [take(t, index) for t in targets]))

    def _eval_prediction(self, unit: Unit, q_in: list, tail: "_Tail") -> float:
        """The weighted prediction difference on the evaluation rows, in chunks."""
        total, rows = 0.0, torch.arange(self.eval_rows.start, self.eval_rows.stop)
        with torch.no_grad():
            for start in range(0, len(rows), self.chunk):
                index = rows[start : start + self.chunk].to(self.device)
                outputs = run_unit(self.module, unit, [take(v, index) for v in q_in])
                total += float(tail.loss(outputs, index)) * len(index)
        return total / max(len(rows), 1)

    def reconstruct(self, unit: Unit, q_in: list, targets: list, acts: list[ActQuant], fp_in: list,
                    tail: Optional["_Tail"] = None) -> dict:
        """Learn the rounding of the unit's layers (its activations ``acts`` quantized, dropped
        at random while training; its inputs ``q_in``, mixed with the float model's ``fp_in``
        with ``input_drop``); its loss before (nearest rounding) and after. ``tail``: the
        prediction difference's term for this unit (:meth:`_Prediction.after`), added to its loss."""
        config, iters = self.config, self.config.iters
        self.number += 1
        quant = [self.by_node[n].module for n in unit.layers]
        names = [self.by_node[n].onnx_name for n in unit.layers]
        for layer in quant:
            layer.mode = "nearest"
        before = self._eval_loss(unit, q_in, targets)
        predicted_before = None if tail is None else self._eval_prediction(unit, q_in, tail)
        start = time.perf_counter()
        started_at = None
        if iters > 0:
            for layer in quant:
                layer.init_rounding(layer.squant_integers() if config.start == "squant" else None)
            if config.start == "squant":  # the loss where learning starts: SQuant's rounding
                for layer in quant:
                    layer.mode = "hard"
                started_at = self._eval_loss(unit, q_in, targets)
            for layer in quant:
                layer.mode = "soft"
                layer.train()
            for act in acts:
                act.train()
                act.start_dropping(config.dropping, self.drops)
            steps = list({id(a.log_step): a.log_step for a in acts
                          if a.log_step is not None and id(a.log_step) not in self.trained_steps}.values())
            self.trained_steps.update(id(p) for p in steps)
            groups = [{"params": [layer.alpha for layer in quant], "lr": config.lr}]
            if steps:
                groups.append({"params": steps, "lr": config.act_lr})
            if config.weight_step_lr > 0:  # each layer's weight step with its rounding (Genie-M)
                groups.append({"params": [layer.learn_scale() for layer in quant], "lr": config.weight_step_lr})
            optimiser = torch.optim.Adam(groups)
            label = f"refine [{self.number}/{self.units}] {names[0]}" + (f" .. {names[-1]}" if len(names) > 1 else "")
            progress = Progress(label, iters)
            batch = min(config.batch_size, self.n_train)
            ranks = None
            if self.world is not None:  # each rank reconstructs its share of every batch; one all-reduce per step
                ranks = Ranks(self.world, [p for group in groups for p in group["params"]], batch, "refine",
                              "--refine-batch-size")
            for step in range(iters):
                index = torch.randint(self.n_train, (batch,), generator=self.batches)
                if ranks is not None:
                    index = ranks.share(index)
                index = index.to(self.device)
                inputs = [take(v, index) for v in q_in]
                if config.input_dropping > 0:
                    inputs = [v if q is f else _mixed(v, take(f, index), config.input_dropping, self.drops)
                              for v, q, f in zip(inputs, q_in, fp_in)]
                outputs = run_unit(self.module, unit, inputs)
                rec = _loss(outputs, [take(t, index) for t in targets])
                loss = rec
                if tail is not None:  # on the quantized prefix's inputs alone, as PD-Quant
                    plain = outputs if config.input_dropping == 0 else run_unit(
                        self.module, unit, [take(v, index) for v in q_in])
                    predicted = tail.loss(plain, index)
                    loss = loss + predicted
                beta = _beta(step, iters, config)
                loss = loss if ranks is None else loss * ranks.weight(len(index))
                if beta is not None and config.reg_weight > 0:  # the weights' own term: once over the ranks
                    loss = loss + config.reg_weight * sum(layer.regulariser(beta) for layer in quant) / (
                        1 if ranks is None else self.world.size)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                if ranks is not None:
                    ranks.reduce()  # the gradients; the loss stays this rank's (only the progress line shows it)
                optimiser.step()
                if (step % 50 == 0 or step == iters - 1) and progress.wanted:
                    progress.update(step + 1, f"rec {rec.item():.4g}"
                                    + ("" if tail is None else f", pd {predicted.item():.4g}"))
            progress.close()
            for layer in quant:
                layer.mode = "hard"
                layer.settle()
                layer.eval()
            for act in acts:
                act.eval()
                act.stop_dropping()
        after = self._eval_loss(unit, q_in, targets)
        prediction = {} if tail is None else {"prediction_before": round(predicted_before, 6),
                                              "prediction_after": round(self._eval_prediction(unit, q_in, tail), 6)}
        flipped = sum(int((layer.integers() != layer.nearest_integers()).sum()) for layer in quant)
        return {"layers": names, "loss_before": round(before, 6),
                **({} if started_at is None else {"loss_start": round(started_at, 6)}), "loss_after": round(after, 6),
                **prediction, "seconds": round(time.perf_counter() - start, 2), "rounded_other_way": flipped,
                "weights": sum(layer.inner.weight.numel() for layer in quant)}


def _export(layers: list[_Layer], model_path: Path, output_path: Path, biases: bool = False) -> dict:
    """Write the model at ``model_path`` with each refined weight replaced by scale·integer
    (and, with ``biases``, each layer's bias by the trained one)."""
    learned: dict[str, RefinedWeight] = {}
    for layer in layers:
        ints = layer.module.integers().detach().cpu().numpy().astype(np.int64)
        learned[layer.weight_name] = RefinedWeight(integers=ints.T if layer.transposed else ints,
                                                   scales=layer.module.scale.detach().cpu().float().flatten().numpy(),
                                                   axis=layer.onnx_axis)
    model = onnx.load(str(model_path))
    trained = {}
    if biases:
        nodes = {node.name: node for node in model.graph.node}
        for layer in layers:
            node, bias = nodes[layer.onnx_name], layer.module.inner.bias
            if bias is not None and len(node.input) > 2 and node.input[2]:
                trained[node.input[2]] = bias.detach().cpu().float().numpy()
    for tensor in model.graph.initializer:
        if tensor.name in learned:
            tensor.CopyFrom(numpy_helper.from_array(dequantized(learned[tensor.name]), tensor.name))
        elif tensor.name in trained and tuple(tensor.dims) == trained[tensor.name].shape:
            tensor.CopyFrom(numpy_helper.from_array(trained[tensor.name], tensor.name))
    onnx.save(model, str(output_path))
    return learned


def dequantized(weight: RefinedWeight) -> np.ndarray:
    """scale · integer in float32, the float weight whose rounding by ORT gives back the integers."""
    shape = [1] * weight.integers.ndim
    if weight.axis is not None:
        shape[weight.axis] = -1
    return (weight.integers * weight.scales.astype(np.float64).reshape(shape)).astype(np.float32)
