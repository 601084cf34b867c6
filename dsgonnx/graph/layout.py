"""Channels-last (NHWC) image inputs: a channels-first twin to work on, the user's layout back.

TensorFlow exports (tf2onnx, Keras) keep the input ``N×H×W×C``. dsgonnx works channels-first
throughout (torch, synthesis, calibration arrays), so :func:`channels_first_twin` gives such a
model an ``N×C×H×W`` input of the same name followed by a ``Transpose`` to the layout its
first nodes expect; nothing else changes, so the twin computes exactly what the file does.
Before a quantized model is written, :func:`channels_last_input` puts the user's interface
back — the same input name and NHWC shape — with one ``Transpose`` in front (ONNX Runtime's
transpose optimizer cancels it against the twin's); :func:`channels_first_input` removes it
again for tools that feed NCHW arrays.
"""

from __future__ import annotations

import onnx
from onnx import helper

TO_NHWC = "dsgonnx_input_to_nhwc"  # the twin's Transpose: NCHW input -> the model's NHWC tensor
TO_NCHW = "dsgonnx_input_to_nchw"  # the exported model's Transpose: NHWC input -> the NCHW graph
_NCHW_TO_NHWC, _NHWC_TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _input(model: onnx.ModelProto, name: str) -> onnx.ValueInfoProto:
    return next(value for value in model.graph.input if value.name == name)


def _rename_uses(model: onnx.ModelProto, old: str, new: str, skip: str) -> None:
    for node in model.graph.node:
        if node.name == skip:
            continue
        for index, value in enumerate(node.input):
            if value == old:
                node.input[index] = new
    for output in model.graph.output:
        if output.name == old:  # an input passed straight through: keep the graph valid
            raise ValueError(f"input {old!r} is also a graph output")


def _set_dims(value: onnx.ValueInfoProto, order: list[int]) -> None:
    dims = list(value.type.tensor_type.shape.dim)
    moved = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for target, source in enumerate(order):
        moved[target].CopyFrom(dims[source])
    del value.type.tensor_type.shape.dim[:]
    value.type.tensor_type.shape.dim.extend(moved)


def _insert_transpose(model: onnx.ModelProto, name: str, node_name: str, perm: list[int], suffix: str) -> None:
    """``name`` (a graph input) now feeds only a Transpose; its former readers read the result."""
    inner = f"{name}{suffix}"
    _rename_uses(model, name, inner, skip=node_name)
    transpose = helper.make_node("Transpose", [name], [inner], name=node_name, perm=perm)
    model.graph.node.insert(0, transpose)


def channels_first_twin(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose NHWC input ``name`` is NCHW, transposed back in front."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    stale = [v for v in twin.graph.value_info if v.name == name]
    for value in stale:
        twin.graph.value_info.remove(value)
    _insert_transpose(twin, name, TO_NHWC, _NCHW_TO_NHWC, "__nhwc")
    _set_dims(_input(twin, name), _NHWC_TO_NCHW)
    return twin


def channels_last_input(model: onnx.ModelProto, name: str) -> None:
    """Give ``model`` (a twin's quantized model, in place) the user's NHWC input back."""
    _insert_transpose(model, name, TO_NCHW, _NHWC_TO_NCHW, "__nchw")
    _set_dims(_input(model, name), _NCHW_TO_NHWC)


def channels_first_input(model: onnx.ModelProto, name: str) -> None:
    """Undo :func:`channels_last_input` in place (``model`` then takes NCHW arrays again)."""
    node = next((n for n in model.graph.node if n.name == TO_NCHW), None)
    if node is None:
        return
    model.graph.node.remove(node)
    _rename_uses(model, node.output[0], name, skip="")
    _set_dims(_input(model, name), _NHWC_TO_NCHW)
