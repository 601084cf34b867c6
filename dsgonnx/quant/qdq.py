"""QuantizeLinear/DequantizeLinear insertion through ``onnxruntime.quantization``.

This is the only module that writes ORT's ``extra_options`` keys. ORT does the graph work
(``quant_pre_process``, ``quantize_static`` in QDQ format); dsgonnx supplies the ranges
(``TensorsData``, through ORT's calibration cache), the bit grids ORT has no type for
(``TensorQuantOverrides`` with B-bit scales), and one step ORT has no option for: an
integer ``Clip`` between QuantizeLinear and DequantizeLinear that keeps simulated
activations on their B-bit range.
"""

from __future__ import annotations

import errno
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from ..config import LogitsPolicy
from ..errors import DataError, UnsupportedModelError
from ..graph.normalize import channel_constant, name_nodes
from ..runtime import quiet_ort
from .bits import BitSpec

LOGITS_POLICIES = LogitsPolicy.values()
# ops whose weights ORT quantizes, with their output-channel axis (None: per-tensor)
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1}


def pre_process(model_path: Path, out_path: Path) -> Path:
    """ORT's pre-processing (shape inference, BN folding, constant folding), with
    fallbacks for graphs its symbolic shape inference or optimiser cannot handle."""
    attempts = ({}, {"skip_symbolic_shape": True}, {"skip_symbolic_shape": True, "skip_optimization": True})
    last_error: Optional[Exception] = None
    for options in attempts:
        try:
            with quiet_ort():
                quant_pre_process(str(model_path), str(out_path), **options)
            break
        except Exception as exc:  # ORT raises many kinds here; try the next, more careful setting
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk, not the model: said as such
            last_error = exc
    else:
        raise UnsupportedModelError(f"ONNX Runtime's quantization pre-processing failed: {last_error}")
    model = onnx.load(str(out_path))
    changed = fold_channel_ops(model) > 0
    if any(not node.name for node in model.graph.node):  # --exclude and refinement address nodes by name
        name_nodes(model.graph)
        changed = True
    if changed:
        onnx.save(model, str(out_path))
    return out_path


_CHANNEL_OPS = ("Add", "Sub", "Mul", "Div")


def fold_channel_ops(model: onnx.ModelProto) -> int:
    """Fold per-channel constant Add/Sub/Mul/Div chains that follow a Conv into its weights
    and bias (BatchNorm written as elementwise ops: ORT's optimiser folds BN nodes, not
    these), in place; returns how many ops were folded. Exact up to float rounding."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed, new_initializers = [], []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if conv.input[1] not in initializers or (has_bias and conv.input[2] not in initializers):
            continue
        weight = numpy_helper.to_array(initializers[conv.input[1]]).astype(np.float64)
        bias = (numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64) if has_bias
                else np.zeros(weight.shape[0]))
        chain, tensor = [], conv.output[0]
        while tensor not in outputs and len(readers.get(tensor, [])) == 1:
            op = readers[tensor][0]
            if op.op_type not in _CHANNEL_OPS or len(op.input) != 2 or op.input[0] != tensor or op.input[1] not in initializers:
                break
            values = channel_constant(initializers[op.input[1]])
            if values is None or values.shape[0] != weight.shape[0] or (op.op_type == "Div" and (values == 0).any()):
                break
            if op.op_type in ("Add", "Sub"):
                bias = bias + values if op.op_type == "Add" else bias - values
            else:
                factor = values if op.op_type == "Mul" else 1.0 / values
                weight, bias = weight * factor.reshape(-1, *[1] * (weight.ndim - 1)), bias * factor
            chain.append(op)
            tensor = op.output[0]
        if not chain:
            continue
        names = (f"{conv.name or conv.output[0]}_folded_W", f"{conv.name or conv.output[0]}_folded_B")
        new_initializers += [numpy_helper.from_array(weight.astype(np.float32), names[0]),
                             numpy_helper.from_array(bias.astype(np.float32), names[1])]
        del conv.input[1:]
        conv.input.extend(names)
        conv.output[0] = tensor
        removed += chain
    for node in removed:
        graph.node.remove(node)
    graph.initializer.extend(new_initializers)
    if removed:  # the constants and the replaced weights nothing reads any more
        used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return len(removed)


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    if current >= opset:
        return model
    try:
        upgraded = version_converter.convert_version(model, opset)
        onnx.checker.check_model(upgraded)
        return upgraded
    except Exception as exc:
        raise UnsupportedModelError(
            f"4/16-bit types need opset 21 and the model (opset {current}) could not be converted: {exc}"
        ) from None


def final_layer(model: onnx.ModelProto) -> Optional[onnx.NodeProto]:
    """The node computing the classifier output: walk back from the first graph output
    through shape-only and normalising ops to the last Gemm/MatMul/Conv."""
    producers = {out: node for node in model.graph.node for out in node.output}
    passthrough = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Softmax", "LogSoftmax", "Sigmoid",
                   "Transpose", "Add", "GlobalAveragePool", "Relu", "Dropout", "Cast"}
    tensor = model.graph.output[0].name
    seen = set()
    while tensor in producers and tensor not in seen:
        seen.add(tensor)
        node = producers[tensor]
        if node.op_type in ("Gemm", "MatMul", "Conv"):
            return node
        if node.op_type not in passthrough:
            return None
        tensor = node.input[0]
    return None


def activation_overrides(ranges: TensorsData, spec: BitSpec, names: Iterable[str]) -> dict:
    """Scale/zero point of the B-bit grid for each activation (simulated bits)."""
    dtype = np.int8 if spec.symmetric else np.uint8
    overrides = {}
    for name in names:
        scale, zero = activation_grid(ranges[name], spec)
        overrides[name] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero, dtype=dtype)}]
    return overrides


def activation_grid(data, spec: BitSpec) -> tuple[float, int]:
    """(scale, zero point) of the B-bit grid over one calibrated range, as ORT computes it
    (the range is widened to include 0)."""
    low_level, high_level = spec.levels
    low, high = min(float(np.min(data.range_value[0])), 0.0), max(float(np.max(data.range_value[1])), 0.0)
    if spec.symmetric:
        scale = max(abs(low), abs(high)) / high_level
        zero = 0
    else:
        scale = (high - low) / (high_level - low_level)
        zero = int(np.clip(round(-low / scale), low_level, high_level)) if scale > 0 else 0
    return (scale if scale > 0 else 1.0), zero


def learned_activation_overrides(grids: dict, spec: BitSpec) -> dict:
    """Overrides carrying learned activation grids (tensor -> (scale, zero point)) verbatim."""
    dtype = np.int8 if spec.symmetric else np.uint8
    return {name: [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(zero, dtype=dtype)}]
            for name, (scale, zero) in grids.items()}


def refined_weight_overrides(refined: dict) -> dict:
    """Overrides carrying learned scales (``RefinedWeight``: ``scales``, ``axis``) verbatim,
    so that ORT's rounding of the refined float weights gives back the learned integers."""
    overrides = {}
    for name, weight in refined.items():
        zero = np.array(0, dtype=np.int8)
        if weight.axis is None:
            overrides[name] = [{"scale": np.array(weight.scales.reshape(-1)[0], dtype=np.float32), "zero_point": zero}]
        else:
            overrides[name] = [{"axis": weight.axis, "scale": np.array(s, dtype=np.float32), "zero_point": zero}
                               for s in weight.scales]
    return overrides


REDUCED_TOP = 64  # ORT's reduced INT8 range is [-64, 64] (quant_utils ONNX_INT_TYPE_REDUCED_RANGE)


def weight_top(spec: BitSpec, reduce_range: bool) -> int:
    """Largest weight integer: the B-bit grid's, 64 for 8-bit weights with reduce_range
    (u8·s8 pairs then sum below 2^15: 2·255·64 = 32640)."""
    return REDUCED_TOP if reduce_range and spec.bits == 8 else spec.levels[1]


def ort_weight_range(spec: BitSpec, reduce_range: bool) -> tuple[int, int]:
    """The integers ORT's symmetric quantizer gives a weight of ``spec``: ±top, but [-8, 7]
    for native INT4 (ORT has no symmetric INT4 range: its scale is 2·max|w|/15)."""
    if spec.quant_type == QuantType.QInt4 and not spec.simulated:
        return -8, 7
    top = weight_top(spec, reduce_range)
    return -top, top


def excluded_nodes(model: onnx.ModelProto, exclude: Iterable[str], logits: str) -> tuple[list[str], Optional[onnx.NodeProto]]:
    """The nodes kept float (the user's, plus the final layer under ``logits="exclude"``)
    and the final layer."""
    names = {node.name for node in model.graph.node}
    exclude = list(exclude)
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise DataError(f"`exclude`: no node named {unknown[0]!r} in the model (after pre-processing)")
    last = final_layer(model)
    if logits == "exclude" and last is not None and last.name not in exclude:
        exclude.append(last.name)
    return exclude, last


@dataclass(frozen=True)
class WeightSite:
    """A weight ONNX Runtime quantizes: input 1 of a node, as an initializer."""

    node: onnx.NodeProto
    weight: str  # initializer name
    axis: Optional[int]  # output-channel axis of the ONNX tensor; None: per-tensor only (a batched MatMul)

    @property
    def transposed(self) -> bool:
        """Whether the ONNX tensor is the transpose of the torch layer's weight: a Gemm with
        transB=0 and a MatMul by a matrix (x·B, an nn.Linear of Bᵀ) hold [in, out]."""
        return self.node.op_type in ("Gemm", "MatMul") and self.axis == 1


def quantized_weights(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[WeightSite]:
    """Every weight ORT's QDQ quantizer quantizes in ``model`` (Conv, ConvTranspose, Gemm and
    MatMul with an initializer as input 1), in graph order, except those of ``exclude``d nodes.
    The one definition: the simulated-bit overrides and reconstruction both use it."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    exclude = set(exclude)
    sites = []
    for node in model.graph.node:
        if node.name in exclude or len(node.input) < 2 or node.input[1] not in ranks:
            continue
        if node.op_type in _WEIGHT_AXIS:
            axis = _WEIGHT_AXIS[node.op_type]
        elif node.op_type == "Gemm":
            axis = 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
        elif node.op_type == "MatMul":  # x·B: B's columns are the outputs (ORT's per-channel axis)
            axis = 1 if ranks[node.input[1]] == 2 else None
        else:
            continue
        sites.append(WeightSite(node, node.input[1], axis))
    return sites


def depthwise_layers(model: onnx.ModelProto, exclude: Iterable[str] = ()) -> list[str]:
    """The Conv nodes among :func:`quantized_weights` whose output channels each read one input
    channel (``group`` > 1, one input channel per group): depthwise convolutions."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [site.node.name for site in quantized_weights(model, exclude) if site.node.op_type == "Conv"
            and next((a.i for a in site.node.attribute if a.name == "group"), 1) > 1
            and len(shapes.get(site.weight, ())) > 1 and shapes[site.weight][1] == 1]


# element-wise activations that follow a layer and that ORT quantizes after it (or folds into
# its output range): the first layer's output runs through them
_LAYER_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "PRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu",
                      "Selu", "Softplus")


def first_layer_tensors(model: onnx.ModelProto) -> set[str]:
    """What ``first_layer_8bit`` keeps on the 8-bit grid: the model input, the tensors between
    it and the first layer with a quantized weight (Pad, ...), that weight, and the layer's
    output with the activations that follow it alone (Relu, ReLU6, HardSwish, ...)."""
    sites = quantized_weights(model)
    if not sites:
        return set()
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {t.name for t in model.graph.initializer}
    layer = sites[0].node
    kept, tensor = {sites[0].weight}, layer.input[0]
    while tensor and tensor not in kept:
        kept.add(tensor)
        node = producers.get(tensor)
        tensor = next((name for name in node.input if name not in initializers), None) if node is not None else None
    tensor = layer.output[0]
    while tensor not in kept:
        kept.add(tensor)
        users = consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type not in _LAYER_ACTIVATIONS or users[0].input[0] != tensor:
            break
        tensor = users[0].output[0]
    return kept


def weight_share(model: onnx.ModelProto, names: Iterable[str]) -> float:
    """The share of the quantized weight values that the initializers ``names`` hold."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    total = sum(sizes[site.weight] for site in quantized_weights(model))
    return sum(sizes.get(name, 0) for name in set(names)) / total if total else 0.0


def weight_overrides(model: onnx.ModelProto, top: int, per_channel: bool, exclude: set[str],
                     names: Optional[set[str]] = None) -> dict:
    """Symmetric scales of the grid ±``top`` for every weight ORT will quantize (or those of
    them in ``names``)."""
    initializers = {t.name: t for t in model.graph.initializer}
    overrides = {}
    for site in quantized_weights(model, exclude):
        if names is not None and site.weight not in names:
            continue
        weight = numpy_helper.to_array(initializers[site.weight]).astype(np.float64)
        if per_channel and site.axis is not None:
            reduce = tuple(i for i in range(weight.ndim) if i != site.axis)
            scales = np.abs(weight).max(axis=reduce) / top
            scales[scales == 0] = 1.0
            overrides[site.weight] = [
                {"axis": site.axis, "scale": np.array(s, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}
                for s in scales
            ]
        else:
            scale = float(np.abs(weight).max() / top) or 1.0
            overrides[site.weight] = [{"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=np.int8)}]
    return overrides


def quantize_qdq(
    model_path: Path,
    output_path: Path,
    ranges: TensorsData,
    weights: BitSpec,
    activations: BitSpec,
    *,
    per_channel: bool,
    reduce_range: bool,
    exclude: Iterable[str] = (),
    logits: str = "exclude",
    refined: Optional[dict] = None,
    learned_activations: Optional[dict] = None,
    keep_8bit: Iterable[str] = (),
) -> dict:
    """Quantize the pre-processed model at ``model_path`` into ``output_path``.

    ``refined``: weight name -> learned grid (:class:`dsgonnx.refine.RefinedWeight`); the
    model's weights must already be scale·integer. ``learned_activations``: tensor -> learned
    (scale, zero point), written as they are. ``keep_8bit``: weights and activations
    (tensor names) that stay on the 8-bit grid when the others are simulated (mixed
    precision). ``reduce_range``: the 8-bit weights on ORT's reduced grid, ±64 (CPUs without
    VNNI, whose u8·s8 kernels saturate at ±127); below 8 bits that is only the kept ones.
    Returns what was decided: excluded nodes, the final layer, simulated tensors.
    """
    logits = LogitsPolicy.parse(logits, "logits")
    keep_8bit = set(keep_8bit)
    model = onnx.load(str(model_path))
    exclude, last = excluded_nodes(model, exclude, logits)
    if activations.needs_opset21:
        # ORT's QDQ MaxPool reads its input's integers, and ONNX Runtime has no 4- or 16-bit
        # MaxPool (the session refuses the model): it runs in float between dequantized input and
        # quantized output instead, the same values (max commutes with the monotone dequantization)
        exclude = [*exclude, *(n.name for n in model.graph.node if n.op_type == "MaxPool" and n.name not in exclude)]
    graph_outputs = {o.name for o in model.graph.output}
    if logits == "float":
        # the classifier's output stays float: no range, no Q/DQ on it
        ranges = TensorsData(ranges.calibration_method,
                             {k: v for k, v in ranges.items() if k not in graph_outputs})
    if last is not None and last.name in exclude:
        # what follows a float final layer (SqueezeNet's Relu, GlobalAveragePool, Softmax) computes
        # the class scores from its float output and stays float too: quantized, the pooled scores
        # were put on the grid of the per-pixel range (the SqueezeNet's W6A6 with real images: 47.22
        # with that tensor quantized, 60.11 without), and at 4 and 16 bits ONNX Runtime fused
        # DequantizeLinear -> Conv -> QuantizeLinear into a QLinearConv without a 4-bit kernel (the
        # session refused the model)
        after = downstream(model, last.output[0])
        ranges = TensorsData(ranges.calibration_method, {k: v for k, v in ranges.items() if k not in after})
        exclude = [*exclude, *(n.name for n in model.graph.node
                               if n.name not in exclude and any(name in after for name in n.input))]
    extra = {
        "ActivationSymmetric": activations.symmetric,
        "WeightSymmetric": weights.symmetric,
        "TensorQuantOverrides": {},
    }
    if logits == "float":
        extra["OpTypesToExcludeOutputQuantization"] = [last.op_type] if last is not None and last.output[0] in graph_outputs else []
    needs21 = weights.needs_opset21 or activations.needs_opset21
    simulated_activations: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dsgonnx-qdq-") as scratch:
        source = Path(model_path)
        if needs21:
            model = upgrade_opset(model, 21)
            source = Path(scratch) / "opset21.onnx"
            onnx.save(model, str(source))
        if weights.simulated:
            overrides = weight_overrides(model, weights.levels[1], per_channel, set(exclude))
            extra["TensorQuantOverrides"].update({k: v for k, v in overrides.items() if k not in keep_8bit})
        if reduce_range and weights.bits != 8:
            # ORT's reduce_range would narrow the B-bit (and native INT4) grids too: the 8-bit
            # weights kept among them get ORT's reduced grid from explicit scales instead
            extra["TensorQuantOverrides"].update(
                weight_overrides(model, REDUCED_TOP, per_channel, set(exclude), names=keep_8bit))
        if refined:
            extra["TensorQuantOverrides"].update(refined_weight_overrides(refined))
        if learned_activations:
            extra["TensorQuantOverrides"].update(learned_activation_overrides(learned_activations, activations))
        # an override without an axis makes ORT quantize the weight per tensor: give the 8-bit
        # weights inside INT4 models their channel axis, as the others have
        axes = {site.weight: site.axis for site in quantized_weights(model, exclude)} if per_channel else {}
        for name, quant_type in eight_bit_types(model, keep_8bit, weights, activations).items():
            for entry in extra["TensorQuantOverrides"].setdefault(name, [{}]):  # learned scales keep their type
                entry["quant_type"] = quant_type
                if axes.get(name) is not None:
                    entry.setdefault("axis", axes[name])
        if activations.simulated:
            simulated_activations = [name for name in ranges.keys()
                                     if name not in extra["TensorQuantOverrides"] and name not in keep_8bit]
            extra["TensorQuantOverrides"].update(activation_overrides(ranges, activations, simulated_activations))
        cache = Path(scratch) / "ranges.json"
        save_tensors_data(ranges, cache)
        try:
            with quiet_ort():
                quantize_static(
                    str(source),
                    str(output_path),
                    calibration_data_reader=None,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range and weights.bits == 8,
                    activation_type=activations.quant_type,
                    weight_type=weights.quant_type,
                    nodes_to_exclude=exclude,
                    calibrate_method=ranges.calibration_method,
                    extra_options=extra,
                    calibration_cache_path=str(cache),
                )
        except (ValueError, TypeError, KeyError) as exc:
            raise UnsupportedModelError(f"ONNX Runtime's quantizer refused the model: {exc}") from None
    if activations.simulated:
        clip_simulated_activations(output_path, activations, keep_8bit)
    return {"excluded_nodes": exclude, "final_layer": None if last is None else last.name,
            "logits": logits.value, "simulated_activation_tensors": len(simulated_activations)}


def downstream(model: onnx.ModelProto, tensor: str) -> set[str]:
    """``tensor`` and every tensor computed from it."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    reached, todo = {tensor}, [tensor]
    while todo:
        for node in readers.get(todo.pop(), []):
            for name in node.output:
                if name and name not in reached:
                    reached.add(name)
                    todo.append(name)
    return reached


def eight_bit_types(model: onnx.ModelProto, keep: set[str], weights: BitSpec, activations: BitSpec) -> dict:
    """tensor -> the 8-bit type of each ``keep`` tensor whose side's type is not 8-bit
    (INT4/UINT4, 16-bit); at simulated widths they stay in their 8-bit containers instead."""
    initializers = {t.name for t in model.graph.initializer}
    types = {}
    for name in keep:
        side = weights if name in initializers else activations
        if side.needs_opset21:
            types[name] = QuantType.QInt8 if name in initializers or side.symmetric else QuantType.QUInt8
    return types


def clip_simulated_activations(path: Path, spec: BitSpec, keep: Iterable[str] = ()) -> None:
    """Insert ``Clip(lo, hi)`` on the integers of every activation QuantizeLinear, so that
    values outside the calibrated range saturate at the B-bit grid's ends, exactly as a
    B-bit integer would, instead of using the 8-bit container's spare levels."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    keep = set(keep)
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in initializers]
    # ORT gives some outputs their input's grid (Pad, MaxPool, Reshape, ...): a QuantizeLinear
    # on the 8-bit grid of a kept tensor is known by its scale, whatever tensor it quantizes
    kept_grids = {n.input[1] for n in activations if n.input[0] in keep}
    quantized = [n for n in activations if n.input[0] not in keep and n.input[1] not in kept_grids]
    if not quantized:
        return
    # the bounds are the grid's absolute integer ends (BitSpec.levels): 0..2^B-1 for
    # asymmetric grids (the zero point lies inside), ±(2^(B-1)-1) for symmetric ones
    renamed = {node.output[0]: node.output[0] + "_clip" for node in quantized}
    if any(output.name in renamed for output in graph.output):
        raise UnsupportedModelError("a quantized graph output cannot be clipped")
    for consumer in graph.node:
        for index, name in enumerate(consumer.input):
            if name in renamed:
                consumer.input[index] = renamed[name]
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.output[0] in renamed and node.op_type == "QuantizeLinear":
            nodes.append(helper.make_node("Clip", [node.output[0], "dsgonnx_sim_min", "dsgonnx_sim_max"],
                                          [renamed[node.output[0]]], name=node.name + "_simclip"))
    dtype = np.int8 if spec.symmetric else np.uint8
    low_level, high_level = spec.levels
    graph.initializer.extend([
        numpy_helper.from_array(np.array(low_level, dtype=dtype), "dsgonnx_sim_min"),
        numpy_helper.from_array(np.array(high_level, dtype=dtype), "dsgonnx_sim_max"),
    ])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))
