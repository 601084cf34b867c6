"""Helpers shared by the converter families."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from onnx import defs
from onnx2torch.node_converters import get_converter as onnx2torch_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, get_const_value

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]


# dsgonnx's own converters, looked up before onnx2torch's (whose registry is never written)
_OURS: dict[tuple[str, int], Converter] = {}


def _since_version(op_type: str, version: int, domain: str = defs.ONNX_DOMAIN) -> int:
    try:
        return defs.get_schema(op_type, max_inclusive_version=version, domain=domain).since_version
    except (RuntimeError, defs.SchemaError):
        return version


def _onnx2torch_has(op_type: str, version: int) -> bool:
    try:
        onnx2torch_converter(operation_type=op_type, version=version)
    except NotImplementedError:
        return False
    return _since_version(op_type, version) == version


def register(op_type: str, versions: Iterable[int]) -> Callable[[Converter], Converter]:
    """Use ``converter`` for each version of ``op_type`` that onnx2torch lacks.

    Versions onnx2torch already knows are left to it, so a newer onnx2torch that adds
    them wins.
    """

    def deco(converter: Converter) -> Converter:
        for version in versions:
            if not _onnx2torch_has(op_type, version):
                _OURS[(op_type, version)] = converter
        return converter

    return deco


def wrap_existing(op_type: str, versions: Iterable[int], handles: Callable[[OnnxNode, OnnxGraph], bool]):
    """Use ``converter`` for the nodes ``handles(node, graph)`` accepts and onnx2torch's own for the rest."""

    def deco(converter: Converter) -> Converter:
        for version in versions:
            fallback = existing_converter(op_type, version) if _onnx2torch_has(op_type, version) else None

            def dispatch(node, graph, _fallback=fallback):
                return converter(node, graph) if _fallback is None or handles(node, graph) else _fallback(node, graph)

            _OURS[(op_type, version)] = dispatch
        return converter

    return deco


def lookup(op_type: str, version: int, domain: str = "") -> Converter:
    """The converter for ``op_type`` in a model of opset ``version``: dsgonnx's own when it
    has one for the op's schema version, else onnx2torch's (NotImplementedError if neither)."""
    if domain in ("", defs.ONNX_DOMAIN):
        ours = _OURS.get((op_type, _since_version(op_type, version)))
        if ours is not None:
            return ours
    return onnx2torch_converter(operation_type=op_type, version=version, domain=domain or defs.ONNX_DOMAIN)


def existing_converter(op_type: str, version: int) -> Converter:
    """onnx2torch's converter for ``op_type`` at ``version`` (never one of dsgonnx's)."""
    try:
        return onnx2torch_converter(operation_type=op_type, version=version)
    except NotImplementedError:
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
