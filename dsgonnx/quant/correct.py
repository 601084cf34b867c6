"""Bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019, §4.2): quantizing a weight W to Q(W) shifts the expected output
of its layer by ΔW·E[x] (ΔW = Q(W) − W). Subtracting that shift from the layer's bias removes
the systematic part of the error, which otherwise builds up layer after layer — the loss of
depthwise networks at 6 and 8 bits is mostly this shift.

E[x], the expected value of each input channel of a layer, comes from one of two places:

* ``analytic`` (no data at all): when the input is ``act(BN(·))`` — an activation (Relu, or a
  Clip to [0, hi] such as ReLU6; or none) of a BatchNorm output, possibly through a zero Pad —
  the BN output of channel i is modelled as N(β_i, γ_i²), so E[x_i] = E[clip(z_i, 0, hi)] in
  closed form. The BN parameters are read from the original model, before ORT folds them:
  the folded Conv keeps the BN's output name.
* ``empirical``: the per-channel mean of the layer's input over the calibration images
  (synthetic or real), from one ONNX Runtime run of the float model.

``auto`` takes the analytic mean where the BN statistics reach a layer and the empirical one
elsewhere (inputs after residual Adds, squeeze-excite products, BN-free models). The first
layer reads the model input, whose mean the first BN gives too where its equations agree
(:func:`input_mean_from_bn`); elsewhere it is measured on the calibration images.

The correction is applied to the QDQ model ORT wrote, from the integers and scales that are
really in it, so it holds for every bit width, target and for learned (refined) roundings
alike; the layer's int32 bias is re-quantized on its own scale. Zero padding makes the shift
at image borders slightly different (the padded zeros have mean 0, not E[x]); that is ignored,
as in the paper.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from ..config import BiasCorrection
from ..runtime import ort_session

_PASS_THROUGH = ("Identity", "Dropout")


def bn_moments(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN output tensor -> (mean β, std |γ|) that the BN gives it (as float64)."""
    inits = {t.name: t for t in model.graph.initializer}
    moments = {}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.input[1] in inits and node.input[2] in inits:
            gamma = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            beta = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
            moments[node.output[0]] = (beta, np.abs(gamma))
    return moments


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2)))


def relu_mean(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """E[max(z, 0)] for z ~ N(mu, sigma²)."""
    sigma = np.maximum(sigma, 1e-12)
    t = mu / sigma
    return mu * _normal_cdf(t) + sigma * _normal_pdf(t)


def clipped_mean(mu: np.ndarray, sigma: np.ndarray, high: Optional[float]) -> np.ndarray:
    """E[clip(z, 0, high)] for z ~ N(mu, sigma²) (high=None: a plain ReLU)."""
    if high is None or not math.isfinite(high):
        return relu_mean(mu, sigma)
    return relu_mean(mu, sigma) - relu_mean(mu - high, sigma)


def _constant(model_inits: dict, name: str) -> Optional[np.ndarray]:
    return numpy_helper.to_array(model_inits[name]) if name in model_inits else None


def _clip_bounds(node: onnx.NodeProto, inits: dict) -> tuple[Optional[float], Optional[float]]:
    if len(node.input) > 1:  # Clip-11+: bounds as inputs
        low = _constant(inits, node.input[1]) if node.input[1] else None
        high = _constant(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return (None if low is None else float(low)), (None if high is None else float(high))
    attrs = {a.name: a.f for a in node.attribute}
    return attrs.get("min"), attrs.get("max")


def _zero_pad(node: onnx.NodeProto, inits: dict) -> bool:
    mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
    if mode != "constant":
        return False
    value = _constant(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return value is None or float(np.asarray(value).reshape(-1)[0]) == 0.0


def _taps_inside(size: int, kernel: int, stride: int, dilation: int, begin: int, end: int) -> np.ndarray:
    """For each kernel tap along one axis, the share of output positions where it reads a real
    pixel (not padding)."""
    outputs = (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1
    starts = np.arange(max(outputs, 0)) * stride - begin
    return np.array([np.mean((starts + i * dilation >= 0) & (starts + i * dilation < size)) for i in range(kernel)])


def input_mean_from_bn(model: onnx.ModelProto, moments: dict, tolerance: float = 0.05) -> Optional[np.ndarray]:
    """E[x] per channel of the model input, solved from the first layer's BatchNorm.

    ``model`` is the pre-processed model (BN folded into the Conv, which keeps the BN's output
    name; Pad sizes folded into constants), ``moments`` the BN statistics (:func:`bn_moments`).
    The BN output's mean is β, so Σ_c S[o,c]·E[x_c] + b_o = β_o, where S sums the folded
    kernel over the taps that read pixels rather than zero padding. There are more output
    channels than input channels: least squares. None where the first layer is not such a
    Conv on a static-size input, or where the equations disagree (relative residual above
    ``tolerance``)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    graph_input = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[2:]):
        return None
    conv = next((n for n in model.graph.node if n.op_type == "Conv"), None)
    if conv is None or conv.output[0] not in moments or conv.input[1] not in inits:
        return None
    attrs = {a.name: a for a in conv.attribute}
    if "auto_pad" in attrs and attrs["auto_pad"].s.decode() not in ("NOTSET", "VALID"):
        return None
    if "group" in attrs and attrs["group"].i != 1:
        return None
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    tensor, node = conv.input[0], producers.get(conv.input[0])
    while node is not None and node.op_type == "Pad" and _zero_pad(node, inits) and node.input[1] in inits:
        extra = [int(v) for v in numpy_helper.to_array(inits[node.input[1]])]  # N, C, H, W begins, then ends
        if len(extra) != 8:
            return None
        pads = [pads[0] + extra[2], pads[1] + extra[3], pads[2] + extra[6], pads[3] + extra[7]]
        tensor, node = node.input[0], producers.get(node.input[0])
    if tensor != graph_input.name:
        return None
    weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
    strides = list(attrs["strides"].ints) if "strides" in attrs else [1, 1]
    dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1, 1]
    rows = _taps_inside(dims[2], weight.shape[2], strides[0], dilations[0], pads[0], pads[2])
    cols = _taps_inside(dims[3], weight.shape[3], strides[1], dilations[1], pads[1], pads[3])
    taps = (weight * rows[:, None] * cols[None, :]).sum(axis=(2, 3))  # out × in
    if taps.shape[0] <= taps.shape[1]:
        return None
    bias = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) \
        if len(conv.input) > 2 and conv.input[2] in inits else 0.0
    target = moments[conv.output[0]][0] - bias
    mean, *_ = np.linalg.lstsq(taps, target, rcond=None)
    residual = np.abs(taps @ mean - target).max() / max(np.abs(target).max(), 1e-12)
    return mean if residual <= tolerance else None


def analytic_means(model: onnx.ModelProto, moments: dict, layers: list[str],
                   input_mean: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Layer (node name) -> E[input channel] where the input is act(BN output) in ``model``,
    or the model input itself when ``input_mean`` (:func:`input_mean_from_bn`) is given."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    means = {}
    for name in layers:
        tensor = nodes[name].input[0]
        node = producers.get(tensor)
        while node is not None and (node.op_type in _PASS_THROUGH or (node.op_type == "Pad" and _zero_pad(node, inits))):
            tensor = node.input[0]
            node = producers.get(tensor)
        low, high = 0.0, None
        if node is None and input_mean is not None and tensor == model.graph.input[0].name:
            means[name] = input_mean
        elif node is not None and node.op_type in ("Relu", "Clip"):
            if node.op_type == "Clip":
                low, high = _clip_bounds(node, inits)
            tensor = node.input[0]
            if low != 0.0:  # only ReLU-like clips have the closed form used here
                continue
            if tensor in moments:
                mu, sigma = moments[tensor]
                means[name] = clipped_mean(mu, sigma, high)
        elif tensor in moments:  # no activation: a linear bottleneck's BN output
            means[name] = moments[tensor][0]
    return means


def tensor_means(model: onnx.ModelProto, path: Path, input_name: str, images: np.ndarray, tensors: list[str],
                 batch: int) -> dict[str, np.ndarray]:
    """Tensor -> its per-channel mean (axis 1) over ``images``, ``model`` run in ONNX Runtime
    with ``tensors`` as its only outputs (saved to ``path`` for the session, then removed); a
    tensor that is the model input is averaged as given."""
    graph_inputs = {i.name for i in model.graph.input}
    wanted = [t for t in dict.fromkeys(tensors) if t not in graph_inputs]
    session = None
    if wanted:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.ValueInfoProto(name=tensor) for tensor in wanted)
        onnx.save(probe, str(path))
        try:
            session = ort_session(path)
        finally:
            Path(path).unlink()
    sums: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch):
        chunk = np.ascontiguousarray(images[start : start + batch], dtype=np.float32)
        values = dict(zip(wanted, session.run(wanted, {input_name: chunk}))) if session is not None else {}
        values.update({tensor: chunk for tensor in graph_inputs & set(tensors)})
        for tensor, value in values.items():
            mean = value.astype(np.float64).mean(axis=(0, *range(2, value.ndim)))
            sums[tensor] = sums.get(tensor, 0.0) + mean * len(value)
    return {tensor: total / len(images) for tensor, total in sums.items()}


def empirical_means(model_path: Path, input_name: str, images: np.ndarray, layers: list[str],
                    batch: int) -> dict[str, np.ndarray]:
    """Layer (node name) -> per-channel mean of its input over ``images`` (float model in ORT)."""
    model = onnx.load(str(model_path))
    nodes = {node.name: node for node in model.graph.node}
    means = tensor_means(model, Path(model_path).with_name(Path(model_path).stem + ".means.onnx"), input_name,
                         images, [nodes[name].input[0] for name in layers], batch)
    return {name: means[nodes[name].input[0]] for name in layers}


def _dequantized(node: onnx.NodeProto, inits: dict) -> tuple[np.ndarray, np.ndarray, Optional[int]]:
    """(integers − zero point, scale broadcast to them, axis) of a DequantizeLinear on an initializer."""
    ints = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
    zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * ints.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), np.asarray(zero).reshape(shape) if np.ndim(zero) else zero
    return ints - zero, scale, axis


def correctable_layers(qdq: onnx.ModelProto) -> list[str]:
    """Conv/Gemm nodes of a QDQ model whose weight is quantized (fed by a DequantizeLinear)."""
    producers = {out: node for node in qdq.graph.node for out in node.output}
    inits = {t.name for t in qdq.graph.initializer}
    layers = []
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1:
            dq = producers.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                layers.append(node.name)
    return layers


def conv_shift(delta: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    """ΔW·E[x] per output channel of a Conv: ``delta`` out × in-per-group × kernel, ``mean``
    one value per input channel; each group of outputs reads its own inputs."""
    per_group = delta.shape[1]
    spatial = delta.reshape(delta.shape[0], per_group, -1).sum(axis=2)  # out × in-per-group
    inputs = mean.reshape(group, per_group)[np.arange(delta.shape[0]) // (delta.shape[0] // group)]
    return (spatial * inputs).sum(axis=1)


def correct_biases(qdq_path: Path, float_model: onnx.ModelProto, means: dict[str, np.ndarray]) -> dict:
    """Subtract ΔW·E[x] from the bias of every layer in ``means`` in the QDQ model at
    ``qdq_path`` (rewritten in place). ``float_model``: the float model ORT quantized (same
    node names), whose weights W are compared with the dequantized Q(W)."""
    qdq = onnx.load(str(qdq_path))
    producers = {out: node for node in qdq.graph.node for out in node.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    float_inits = {t.name: t for t in float_model.graph.initializer}
    float_nodes = {node.name: node for node in float_model.graph.node}
    corrected, largest = [], 0.0
    for node in qdq.graph.node:
        if node.name not in means or node.name not in float_nodes:
            continue
        weight = numpy_helper.to_array(float_inits[float_nodes[node.name].input[1]]).astype(np.float64)
        ints, scale, _ = _dequantized(producers[node.input[1]], inits)
        delta = ints * scale - weight
        mean = np.asarray(means[node.name], dtype=np.float64)
        if node.op_type == "Conv":
            shift = conv_shift(delta, mean, next((a.i for a in node.attribute if a.name == "group"), 1))
        else:  # Gemm: y = x·B (+ C), B is in×out, or out×in with transB
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            shift = (delta if trans_b else delta.T) @ mean
        if not np.all(np.isfinite(shift)):
            continue
        _set_bias(qdq, node, producers, inits, shift)
        corrected.append(node.name)
        largest = max(largest, float(np.abs(shift).max()))
    onnx.save(qdq, str(qdq_path))
    return {"layers": len(corrected), "largest_shift": round(largest, 6)}


def _set_bias(qdq: onnx.ModelProto, node: onnx.NodeProto, producers: dict, inits: dict, shift: np.ndarray) -> None:
    """bias ← bias − shift, keeping the bias's form (int32 on its scale, or float)."""
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    dq = producers.get(bias_name) if bias_name else None
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
        ints, scale, _ = _dequantized(dq, inits)
        scale = scale.reshape(-1) * np.ones_like(ints)
        safe = np.where(scale > 0, scale, 1.0)
        new = np.clip(np.rint((ints * scale - shift) / safe), -(2**31), 2**31 - 1)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(new.astype(np.int32), dq.input[0]))
    elif bias_name and bias_name in inits:
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
        inits[bias_name].CopyFrom(numpy_helper.from_array((bias - shift).astype(np.float32), bias_name))
    else:  # no bias yet: add a float one (as ORT leaves a bias it could not quantize)
        name = f"{node.name}_dsgonnx_bias_correction"
        qdq.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name


def input_means(mode: BiasCorrection, original: Optional[onnx.ModelProto], prepared_path: Path, layers: list[str],
                input_name: str, images: np.ndarray, batch: int) -> tuple[dict[str, np.ndarray], dict]:
    """E[x] per layer as ``mode`` says, and which source each layer's mean came from
    (``input_mean``: where the model input's mean came from, for the first layer).
    ``original``: the model with its BatchNorm nodes (None: no analytic means)."""
    prepared = onnx.load(str(prepared_path))
    moments = bn_moments(original) if original is not None and mode != BiasCorrection.EMPIRICAL else {}
    # the model input's mean from the first BN wherever its equations agree: measured on the
    # three ImageNet models, it raises top-1 agreement with FP32 at W8A8 and W6A6 on all three,
    # and makes DSG and real calibration give the same MobileNet (README, "Bias correction")
    input_mean = input_mean_from_bn(prepared, moments) if moments else None
    analytic = analytic_means(prepared, moments, layers, input_mean) if moments else {}
    source = "first BN" if input_mean is not None else "calibration images"
    if mode == BiasCorrection.ANALYTIC:
        return analytic, {"analytic": len(analytic), "empirical": 0, "uncorrected": len(layers) - len(analytic),
                          "input_mean": "first BN" if input_mean is not None else None}
    rest = [name for name in layers if name not in analytic]
    empirical = empirical_means(prepared_path, input_name, images, rest, batch) if rest else {}
    return analytic | empirical, {"analytic": len(analytic), "empirical": len(empirical), "uncorrected": 0,
                                  "input_mean": source}
