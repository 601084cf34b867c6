"""Rewrites of a loaded model that make it convertible to torch without changing its maths.

- every node gets a unique, non-empty name (the names BN layers are reported by);
- weights held in ``Constant`` nodes become initializers (onnx2torch builds real
  ``nn.BatchNorm2d``/``Conv`` parameters only from initializers);
- initializers are dropped from the graph inputs (old exporters list weights as inputs);
- float16 models are computed in float32 (a differentiable torch graph in fp16 on CPU
  is slow and loses the small gradients synthesis needs).

The ONNX Runtime reference always runs the original file, untouched.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def for_torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A converted copy of ``model``; the argument is not modified."""
    model = copy.deepcopy(model)
    name_nodes(model.graph)
    constants_to_initializers(model.graph)
    drop_initializer_inputs(model.graph)
    if _uses_float16(model.graph):
        float16_to_float32(model.graph)
    return model


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes ``<OpType>_<index>`` and make every name unique."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{index}"
        candidate, suffix = name, 1
        while candidate in seen:
            candidate, suffix = f"{name}_{suffix}", suffix + 1
        node.name = candidate
        seen.add(candidate)


def constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Move ``Constant`` nodes (tensor or numeric-list values) into the initializer list."""
    outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.output[0] not in outputs else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(keep)


def _constant_tensor(node: onnx.NodeProto):
    if len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return copy.deepcopy(attr.t)
    if attr.name == "value_float":
        return numpy_helper.from_array(np.array(attr.f, dtype=np.float32))
    if attr.name == "value_floats":
        return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32))
    if attr.name == "value_int":
        return numpy_helper.from_array(np.array(attr.i, dtype=np.int64))
    if attr.name == "value_ints":
        return numpy_helper.from_array(np.array(list(attr.ints), dtype=np.int64))
    return None  # strings and sparse tensors stay Constant nodes


def drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(keep)


def _uses_float16(graph: onnx.GraphProto) -> bool:
    values = list(graph.input) + list(graph.output)
    return any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in values) or any(
        t.data_type == TensorProto.FLOAT16 for t in graph.initializer
    )


def float16_to_float32(graph: onnx.GraphProto) -> None:
    """Retype every float16 tensor, value and Cast target of ``graph`` as float32."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            upcast = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
            graph.initializer[index].CopyFrom(upcast)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            elif attr.type == onnx.AttributeProto.GRAPH:
                float16_to_float32(attr.g)
