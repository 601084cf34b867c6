"""Rewrites of a loaded model that make it convertible to torch without changing its maths.

- every node gets a unique, non-empty name (the names BN layers are reported by);
- weights held in ``Constant`` nodes become initializers (onnx2torch builds real
  ``nn.BatchNorm2d``/``Conv`` parameters only from initializers);
- nodes computed only from constants are folded into initializers (torch's dynamo
  exporter, unoptimised, builds a Conv's zero bias as Expand(CastLike(0, x), Shape(W)));
- initializers are dropped from the graph inputs (old exporters list weights as inputs);
- a Dropout's mask output nothing reads is dropped (onnx2torch's Dropout gives the data alone);
- float16 models are computed in float32 (a differentiable torch graph in fp16 on CPU
  is slow and loses the small gradients synthesis needs).

The ONNX Runtime reference always runs the original file, untouched.
"""

from __future__ import annotations

import copy
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def for_torch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A converted copy of ``model``; the argument is not modified."""
    model = copy.deepcopy(model)
    name_nodes(model.graph)
    constants_to_initializers(model.graph)
    drop_initializer_inputs(model.graph)
    drop_unused_dropout_masks(model.graph)
    fold_constants(model)
    if _uses_float16(model.graph):
        float16_to_float32(model.graph)
    return model


def channel_constant(tensor: onnx.TensorProto) -> "np.ndarray | None":
    """The values (float64) of a per-channel constant of an N×C×H×W tensor — shape C×1×1 or
    1×C×1×1, finite — else None."""
    values = numpy_helper.to_array(tensor)
    shape = tuple(values.shape)
    if len(shape) == 3 and shape[1:] == (1, 1) or len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1):
        flat = values.astype(np.float64).reshape(-1)
        return flat if np.isfinite(flat).all() else None
    return None


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


# Never folded: their value is not a function of their inputs, or they hold subgraphs.
_NOT_FOLDABLE = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                 "Bernoulli", "If", "Loop", "Scan", "Dropout"}
_FOLD_LIMIT_BYTES = 64 << 20


def fold_constants(model: onnx.ModelProto) -> None:
    """Replace nodes whose inputs are all initializers by initializers holding their output.

    ``CastLike`` whose target type is known statically becomes ``Cast`` first, so
    constant-only chains through it fold too. Evaluated with ONNX's reference runtime.
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    elem_types = _known_elem_types(graph)
    graph_outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if node.op_type == "CastLike" and node.input[0] in constants and node.input[1] in elem_types:
            target = elem_types[node.input[1]]
            node = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=target)
        inputs = [name for name in node.input if name]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in _NOT_FOLDABLE
            and inputs
            and all(name in constants for name in inputs)
            and not graph_outputs.intersection(node.output)
        )
        values = _evaluate(ReferenceEvaluator, node, constants, model) if foldable else None
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            constants[name] = tensor
            graph.initializer.append(tensor)
            elem_types[name] = tensor.data_type
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input} | graph_outputs
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)


def _known_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info)
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _evaluate(evaluator_cls, node: onnx.NodeProto, constants: dict, model: onnx.ModelProto):
    feeds = {name: numpy_helper.to_array(constants[name]) for name in node.input if name}
    inputs = [helper.make_tensor_value_info(name, constants[name].data_type, None) for name in feeds]
    outputs = [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in node.output if name]
    single = helper.make_model(
        helper.make_graph([node], "fold", inputs, outputs),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    try:
        values = evaluator_cls(single).run(None, feeds)
    except Exception:  # the reference runtime lacks the op or rejects it: leave the node alone
        return None
    if sum(np.asarray(v).nbytes for v in values) > _FOLD_LIMIT_BYTES:
        return None
    return values


def drop_initializer_inputs(graph: onnx.GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    keep = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(keep)


def drop_unused_dropout_masks(graph: onnx.GraphProto) -> None:
    """Remove the optional mask output of Dropout nodes where nothing reads it (onnx.version_converter
    writes one when it lifts an old Dropout to opset 12+; onnx2torch's Dropout returns the data alone,
    and its graph would then index into the batch for the mask)."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] not in read:
            del node.output[1:]


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


CAST_IN = "dsgonnx_input_to_float32"  # the quantized model's Cast: the file's float16 (or uint8) input -> float32


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    """Every node's input or output ``old`` becomes ``new``, in place."""
    for node in model.graph.node:
        for names in (node.input, node.output):
            for index, value in enumerate(names):
                if value == old:
                    names[index] = new


def file_interface(model: onnx.ModelProto, name: str, outputs: Iterable[str],
                   input_type: int = TensorProto.FLOAT16) -> None:
    """Give ``model`` (a float32 twin's quantized model, in place) the file's own interface
    back: its input ``name`` of ``input_type`` (float16, or a uint8 file's pixels) cast to
    float32 in front of the graph, and the graph ``outputs`` (those the file gives in float16)
    cast to float16 after it, under the same names."""
    outputs = set(outputs)
    inner = f"{name}__float32"
    _rename(model, name, inner)
    model.graph.node.insert(0, helper.make_node("Cast", [name], [inner], name=CAST_IN, to=TensorProto.FLOAT))
    next(v for v in model.graph.input if v.name == name).type.tensor_type.elem_type = input_type
    for output in model.graph.output:
        if output.name not in outputs or output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        computed = f"{output.name}__float32"
        _rename(model, output.name, computed)
        model.graph.node.append(helper.make_node("Cast", [computed], [output.name], name=f"dsgonnx_{output.name}_to_float16",
                                                 to=TensorProto.FLOAT16))
        output.type.tensor_type.elem_type = TensorProto.FLOAT16
    stale = {name, *(o.name for o in model.graph.output)}
    kept = [v for v in model.graph.value_info if v.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def float32_interface(model: onnx.ModelProto, name: str) -> None:
    """Undo :func:`file_interface` in place (``model`` then takes and gives float32 arrays)."""
    casts = [n for n in model.graph.node if n.name == CAST_IN or (n.op_type == "Cast" and n.name.startswith("dsgonnx_")
                                                                  and n.name.endswith("_to_float16"))]
    for node in casts:
        model.graph.node.remove(node)
        if node.name == CAST_IN:
            _rename(model, node.output[0], name)
            next(v for v in model.graph.input if v.name == name).type.tensor_type.elem_type = TensorProto.FLOAT
        else:
            _rename(model, node.input[0], node.output[0])
            next(o for o in model.graph.output if o.name == node.output[0]).type.tensor_type.elem_type = TensorProto.FLOAT
