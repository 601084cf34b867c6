"""What a QDQ model quantizes, read back from the model ONNX Runtime wrote.

ONNX Runtime decides where QuantizeLinear/DequantizeLinear go (Conv inputs and outputs, the
inputs of residual Adds, pooling, Reshape, the model input, ...), merges some (a Relu or
ReLU6 after a layer is removed and the layer's output takes the activation's grid), and
gives some tensors their input's grid (MaxPool, Pad, Reshape). Rather than predict those
rules, :func:`read_placement` reads the written model: every quantized activation with its
exact grid (scale, zero point, the integer type's range, narrowed by dsgonnx's integer
``Clip`` for simulated widths), and every quantized constant (weights, int32 biases) with
its integers. Names are those of the float model ORT quantized, so a simulation built on
that float model (:mod:`dsgonnx.refine.simulate`) quantizes exactly these tensors.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import UnsupportedModelError

# the integer range QuantizeLinear saturates to, per output type
_TYPE_RANGES = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
    TensorProto.UINT4: (0, 15),
    TensorProto.INT4: (-8, 7),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Grid:
    """An activation's grid: x̂ = scale · (clamp(round(x / scale) + zero_point, low, high) − zero_point)."""

    scale: float
    zero_point: int
    low: int
    high: int
    group: str = ""  # the scale's initializer: ORT puts some tensors on another's grid (Pad, Slice, Flatten)


@dataclass(frozen=True)
class Constant:
    """A quantized initializer as the QDQ model holds it."""

    integers: np.ndarray  # int64, in the ONNX tensor's layout
    scales: np.ndarray  # float32: one, or one per slice along ``axis``
    zero_points: np.ndarray  # int64, shaped as ``scales``
    axis: Optional[int]
    low: int  # the integer type's range
    high: int

    @property
    def values(self) -> np.ndarray:
        """The dequantized float values DequantizeLinear computes."""
        shape = [1] * self.integers.ndim
        if self.axis is not None:
            shape[self.axis] = -1
        scales = self.scales.astype(np.float32).reshape(shape)
        zeros = self.zero_points.reshape(shape)
        return ((self.integers - zeros).astype(np.float32) * scales).astype(np.float32)


@dataclass
class Placement:
    """Everything a QDQ model quantizes, by the names of the float model it came from.

    ``activations``: float tensor -> its grid. ``constants``: (node name, input index) ->
    the quantized initializer that input reads. ``float_readers``: quantized tensors that
    some node still reads unquantized (a simulation per tensor would quantize them for it
    too; empty for what ORT writes by default). ``dequantized``: for each activation, the
    name of a tensor in the QDQ model that holds its quantized value (a DequantizeLinear's
    output)."""

    activations: dict[str, Grid]
    constants: dict[tuple[str, int], Constant]
    float_readers: list[str]
    dequantized: dict[str, str] = field(default_factory=dict)  # activation -> a DequantizeLinear output of it


def read_placement(model: onnx.ModelProto) -> Placement:
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    activations: dict[str, Grid] = {}
    constants: dict[tuple[str, int], Constant] = {}
    readers: dict[str, set[str]] = {}  # dequantized tensor name -> the float tensor it stands for
    dequantized: dict[str, str] = {}

    def array(name: str) -> np.ndarray:
        if name not in initializers:
            raise UnsupportedModelError(f"QDQ model: {name!r} is not an initializer (a scale or zero point must be)")
        return numpy_helper.to_array(initializers[name])

    for dq in (n for n in graph.node if n.op_type == "DequantizeLinear"):
        source = dq.input[0]
        if source in initializers:
            continue  # a constant: recorded below, per consumer
        low, high, node = None, None, producers.get(source)
        if node is not None and node.op_type == "Clip":  # dsgonnx's integer clip (simulated widths)
            low, high = int(array(node.input[1])), int(array(node.input[2]))
            node = producers.get(node.input[0])
        if node is None or node.op_type != "QuantizeLinear":
            raise UnsupportedModelError(f"QDQ model: DequantizeLinear {dq.name!r} does not read a QuantizeLinear")
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero is None or zero.data_type not in _TYPE_RANGES:
            raise UnsupportedModelError(f"QDQ model: QuantizeLinear {node.name!r} has no zero point of a known type")
        type_low, type_high = _TYPE_RANGES[zero.data_type]
        scale = array(node.input[1])
        if scale.size != 1:
            raise UnsupportedModelError(f"QDQ model: activation {node.input[0]!r} has per-channel scales")
        # a quantized graph output: ORT renames its producer's output and DQ writes the name
        tensor = dq.output[0] if dq.output[0] in outputs else node.input[0]
        activations[tensor] = Grid(scale=float(scale.reshape(-1)[0]), zero_point=int(numpy_helper.to_array(zero)),
                                   low=max(type_low, low) if low is not None else type_low,
                                   high=min(type_high, high) if high is not None else type_high,
                                   group=node.input[1])
        readers[dq.output[0]] = tensor
        dequantized.setdefault(tensor, dq.output[0])

    float_readers = set()
    for node in graph.node:
        if node.op_type in _QDQ_OPS or node.name.endswith("_simclip"):
            continue
        for index, name in enumerate(node.input):
            if name in activations and name not in outputs:
                float_readers.add(name)
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in initializers:
                continue
            integers = array(dq.input[0])
            scales = array(dq.input[1]).astype(np.float32)
            zero = initializers.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
            zeros = (numpy_helper.to_array(zero).astype(np.int64) if zero is not None
                     else np.zeros(scales.shape, dtype=np.int64))
            data_type = initializers[dq.input[0]].data_type
            if data_type not in _TYPE_RANGES:
                raise UnsupportedModelError(f"QDQ model: constant {dq.input[0]!r} is not of an integer type")
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if scales.size > 1 else None
            if axis is not None and axis < 0:
                axis += integers.ndim
            constants[(node.name, index)] = Constant(integers.astype(np.int64), scales.reshape(-1),
                                                     zeros.reshape(-1), axis, *_TYPE_RANGES[data_type])
    return Placement(activations=activations, constants=constants, float_readers=sorted(float_readers),
                     dequantized=dequantized)


def placement_of(model_path: Path, ranges, weights, activations, **options) -> Placement:
    """The placement of the QDQ model ORT writes for the float model at ``model_path`` with
    plain rounding (``options``: those of :func:`~dsgonnx.quant.qdq.quantize_qdq`)."""
    from .qdq import quantize_qdq

    with tempfile.TemporaryDirectory(prefix="dsgonnx-placement-") as scratch:
        out = Path(scratch) / "plain.onnx"
        quantize_qdq(model_path, out, ranges, weights, activations, **options)
        return read_placement(onnx.load(str(out)))
