"""Helpers shared by the converter families."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from onnx import defs
from onnx2torch.node_converters.registry import (
    _CONVERTER_REGISTRY,
    OperationDescription,
    add_converter,
)
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, get_const_value

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


def register(op_type: str, versions: Iterable[int]) -> Callable[[Converter], Converter]:
    """Register ``converter`` for each version of ``op_type`` that onnx2torch lacks.

    Versions onnx2torch already knows are left alone, so a newer onnx2torch that adds
    them wins instead of failing at import.
    """

    def deco(converter: Converter) -> Converter:
        for version in versions:
            key = OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op_type, version=version)
            if key not in _CONVERTER_REGISTRY:
                add_converter(operation_type=op_type, version=version)(converter)
        return converter

    return deco


def wrap_existing(op_type: str, versions: Iterable[int], handles: Callable[[OnnxNode], bool]):
    """Put ``converter`` in front of onnx2torch's own converter for nodes ``handles`` accepts.

    ``add_converter`` refuses to register a version twice, so this is the one place that
    edits the registry entry directly; other nodes still go to onnx2torch's converter.
    """

    def deco(converter: Converter) -> Converter:
        for version in versions:
            key = OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op_type, version=version)
            original = _CONVERTER_REGISTRY.get(key)
            if original is None:
                add_converter(operation_type=op_type, version=version)(converter)
                continue

            def dispatch(node, graph, _original=original):
                return converter(node, graph) if handles(node) else _original(node, graph)

            _CONVERTER_REGISTRY[key] = dispatch
        return converter

    return deco


def existing_converter(op_type: str, version: int) -> Converter:
    """onnx2torch's converter registered under exactly ``version`` (no schema lookup,
    which would route an old version straight back to dsgonnx's own converter)."""
    key = OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op_type, version=version)
    try:
        return _CONVERTER_REGISTRY[key]
    except KeyError:
        raise NotImplementedError(f"onnx2torch has no {op_type}-{version} converter to reuse") from None


def delegate(node: OnnxNode, graph: OnnxGraph, version: int) -> OperationConverterResult:
    """Convert ``node`` with onnx2torch's converter for an older, equivalent version."""
    return existing_converter(node.operation_type, version)(node, graph)


def const_input(node: OnnxNode, graph: OnnxGraph, index: int) -> Any | None:
    """The value of input ``index`` if it is an initializer or Constant output, else None.

    Returns None also for an absent (empty-named) optional input.
    """
    if index >= len(node.input_values) or not node.input_values[index]:
        return None
    try:
        return get_const_value(node.input_values[index], graph)
    except KeyError:
        return None


def has_input(node: OnnxNode, index: int) -> bool:
    return index < len(node.input_values) and bool(node.input_values[index])


def unsupported(node: OnnxNode, what: str) -> NotImplementedError:
    return NotImplementedError(f"{node.operation_type} node '{node.name or node.unique_name}': {what}")
