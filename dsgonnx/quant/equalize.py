"""Cross-layer equalization (CLE; Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019, §4.1) as a pure ONNX graph transform.

Two convolutions joined by a positively homogeneous function f (ReLU, zero padding, or
nothing) compute the same thing when output channel i of the first is divided by s_i > 0
and input channel i of the second is multiplied by it: f(x / s) = f(x) / s. CLE picks
s_i = sqrt(r1_i / r2_i), with r1_i the range (max |w|) of the first conv's output channel i
and r2_i that of the second conv's input channel i, so both become sqrt(r1_i · r2_i). A conv
can be the second layer of one pair and the first of the next (depthwise chains), so all
pairs are swept repeatedly until no scale changes any more.

The FP32 function must not change. Two things need care:

* ReLU6 — Clip(0, hi) — is not scale-equivariant: clip(x / s, 0, hi) ≠ clip(x, 0, hi) / s.
  Replacing it by a plain ReLU (AIMET's approach) wrecks BN-folded MobileNets, whose
  pre-activations go well past 6. Instead the Clip becomes Relu followed by Min against the
  per-channel bound hi / s_i, which is exact.
* Channels whose weights are (near) zero after BN folding — MobileNet v1 0.25 has some at
  ~1e-12 — output only their bias; a tiny s_i would blow that bias up. They are left alone.

Expects a BN-folded float model (the output of :func:`dsgonnx.quant.qdq.pre_process`).
Note that the gain is for per-tensor weight grids: with per-channel weights and per-tensor
activations CLE mostly moves range from the weights into the activations.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

# a channel whose range is below this fraction of its layer's largest is treated as dead
_DEAD = 1e-6


@dataclass
class Pair:
    """Conv1 -> [Relu | Clip(0, hi)] -> [zero Pad] -> Conv2."""

    conv1: onnx.NodeProto
    act: Optional[onnx.NodeProto]
    pad: Optional[onnx.NodeProto]
    conv2: onnx.NodeProto
    high: Optional[float]  # the Clip's finite upper bound, if any


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Graph:
    """Lookups over a model's nodes and initializers."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = {o.name for o in model.graph.output}

    def array(self, name: str) -> Optional[np.ndarray]:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        if name in self.constants:
            value = _attr(self.constants[name], "value")
            return None if value is None else numpy_helper.to_array(value)
        return None

    def only_consumer(self, tensor: str) -> Optional[onnx.NodeProto]:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None

    def private(self, node: onnx.NodeProto, index: int) -> str:
        """Make ``node.input[index]`` an initializer that no other node reads; return its name."""
        name = node.input[index]
        if len(self.consumers[name]) == 1 and name not in self.outputs:
            return name
        copy = numpy_helper.from_array(self.array(name), f"{name}__cle_{node.name or node.output[0]}")
        self.graph.initializer.append(copy)
        self.inits[copy.name] = self.graph.initializer[-1]
        self.consumers[name].remove(node)
        self.consumers[copy.name].append(node)
        node.input[index] = copy.name
        return copy.name


def _clip_bounds(graph: _Graph, node: onnx.NodeProto) -> tuple[Optional[float], Optional[float]]:
    """(low, high) of a Clip; None where unbounded or not a constant."""
    low, high = _attr(node, "min"), _attr(node, "max")  # Clip < 11
    for index in (1, 2):
        if len(node.input) > index and node.input[index]:
            value = graph.array(node.input[index])
            bound = None if value is None or value.size != 1 else float(value.reshape(-1)[0])
            low, high = (bound, high) if index == 1 else (low, bound)
    return low, high


def _is_zero_pad(graph: _Graph, node: onnx.NodeProto) -> bool:
    """A constant-0 Pad of the spatial axes of an NCHW tensor only."""
    if _attr(node, "mode", b"constant") not in (b"constant", "constant"):
        return False
    if len(node.input) > 3 and node.input[3]:  # explicit axes: not worth the bookkeeping
        return False
    if len(node.input) > 2 and node.input[2]:
        value = graph.array(node.input[2])
        if value is None or np.any(value != 0):
            return False
    pads = graph.array(node.input[1]) if len(node.input) > 1 else np.asarray(_attr(node, "pads", []))
    if pads is None or pads.size != 8:
        return False
    return bool(np.all(pads.reshape(2, 4)[:, :2] == 0))


def _in_channels(w2: np.ndarray, group: int, channels: int) -> list[tuple[slice, int]]:
    """For each input channel i of a (grouped) Conv2 weight [Cout, Cin/g, kh, kw]: the output
    channels that read it and its index within their group."""
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // group
    return [
        (slice((i // per_group_in) * per_group_out, (i // per_group_in + 1) * per_group_out), i % per_group_in)
        for i in range(channels)
    ]


def _find_pairs(graph: _Graph, opset: int) -> list[Pair]:
    pairs = []
    for conv1 in graph.graph.node:
        if conv1.op_type != "Conv" or conv1.input[1] not in graph.inits:
            continue
        if len(conv1.input) > 2 and conv1.input[2] and conv1.input[2] not in graph.inits:
            continue
        tensor, act, pad, high = conv1.output[0], None, None, None
        node = graph.only_consumer(tensor)
        if node is not None and node.op_type in ("Relu", "Clip"):
            if node.op_type == "Clip":
                low, high = _clip_bounds(graph, node)
                if low != 0.0 or (high is not None and not math.isfinite(high)):
                    continue
                if high is not None and opset < 8:  # the per-channel Min needs broadcasting
                    continue
            act, tensor = node, node.output[0]
            node = graph.only_consumer(tensor)
        if node is not None and node.op_type == "Pad" and _is_zero_pad(graph, node):
            pad, tensor = node, node.output[0]
            node = graph.only_consumer(tensor)
        if node is None or node.op_type != "Conv" or node.input[0] != tensor or node.input[1] not in graph.inits:
            continue
        w1, w2 = graph.inits[conv1.input[1]], graph.inits[node.input[1]]
        if len(w1.dims) < 3 or w2.dims[1] * _attr(node, "group", 1) != w1.dims[0]:
            continue
        pairs.append(Pair(conv1, act, pad, node, high))
    return pairs


def find_pairs(model: onnx.ModelProto) -> list[Pair]:
    """The Conv pairs :func:`equalize` rescales, in graph order (nodes of ``model`` itself)."""
    return _find_pairs(_Graph(model), _opset(model))


def _bias(conv: onnx.NodeProto) -> Optional[str]:
    return conv.input[2] if len(conv.input) > 2 and conv.input[2] else None


def _bound_with_min(model: onnx.ModelProto, pair: Pair, scale: np.ndarray, dtype: np.dtype) -> None:
    """Clip(0, hi) -> Relu, Min(·, hi / s) with a [C, 1, 1] bound; the Min keeps the output name."""
    act, out = pair.act, pair.act.output[0]
    bound = numpy_helper.from_array((pair.high / scale).astype(dtype).reshape(-1, 1, 1), f"{out}__cle_bound")
    model.graph.initializer.append(bound)
    del act.input[1:]
    del act.attribute[:]
    act.op_type = "Relu"
    act.output[0] = f"{out}__cle_relu"
    position = list(model.graph.node).index(act) + 1
    model.graph.node.insert(
        position, helper.make_node("Min", [act.output[0], bound.name], [out], name=f"{act.name or out}__cle_min")
    )


def equalize(model: onnx.ModelProto, *, iterations: int = 100, tolerance: float = 1e-4) -> tuple[onnx.ModelProto, dict]:
    """CLE on a BN-folded float model: a new, FP32-equivalent model (``model`` is not touched)
    and a report {"pairs", "sweeps", "converged", "relu6_bounded"}. Sweeps stop once no
    per-channel scale changes by more than ``tolerance`` (relative), or after ``iterations``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = _Graph(model)
    pairs = _find_pairs(graph, _opset(model))
    for pair in pairs:  # shared initializers get a copy per node
        graph.private(pair.conv1, 1)
        graph.private(pair.conv2, 1)
        if _bias(pair.conv1):
            graph.private(pair.conv1, 2)
    arrays = {
        name: graph.array(name).astype(np.float64)
        for pair in pairs
        for name in (pair.conv1.input[1], pair.conv2.input[1], _bias(pair.conv1))
        if name
    }
    total = [np.ones(graph.inits[pair.conv1.input[1]].dims[0]) for pair in pairs]

    sweeps, converged = 0, not pairs
    while pairs and sweeps < iterations and not converged:
        sweeps += 1
        change = 0.0
        for pair, accumulated in zip(pairs, total):
            w1, w2 = arrays[pair.conv1.input[1]], arrays[pair.conv2.input[1]]
            channels = w1.shape[0]
            view = _in_channels(w2, _attr(pair.conv2, "group", 1), channels)
            r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
            r2 = np.array([np.abs(w2[out, j]).max() for out, j in view])
            live = (r1 > _DEAD * r1.max()) & (r2 > _DEAD * r2.max())
            scale = np.ones(channels)
            scale[live] = np.sqrt(r1[live] / r2[live])
            arrays[pair.conv1.input[1]] = w1 / scale.reshape(-1, *[1] * (w1.ndim - 1))
            if _bias(pair.conv1):
                arrays[_bias(pair.conv1)] /= scale
            w2 = w2.copy()
            for i, (out, j) in enumerate(view):
                w2[out, j] *= scale[i]
            arrays[pair.conv2.input[1]] = w2
            accumulated *= scale
            change = max(change, float(np.abs(np.log(scale)).max()))
        converged = change < tolerance

    for name, value in arrays.items():
        dtype = helper.tensor_dtype_to_np_dtype(graph.inits[name].data_type)
        graph.inits[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    bounded, dropped = 0, set()
    for pair, accumulated in zip(pairs, total):
        if pair.high is not None:
            dropped.update(pair.act.input[1:])
            dtype = helper.tensor_dtype_to_np_dtype(graph.inits[pair.conv1.input[1]].data_type)
            _bound_with_min(model, pair, accumulated, dtype)
            bounded += 1
    used = {name for node in model.graph.node for name in node.input}
    for name in dropped - used - {i.name for i in model.graph.input} - {""}:  # the rewritten Clips' bounds
        if name in graph.inits:
            model.graph.initializer.remove(graph.inits[name])
    return model, {"pairs": len(pairs), "sweeps": sweeps, "converged": converged, "relu6_bounded": bounded}
