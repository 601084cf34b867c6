"""Activation ops newer than onnx2torch: Gelu (opset 20) and Mish (opset 18), which the dynamo
exporter writes for ``nn.GELU`` and ``nn.Mish`` from those opsets on (earlier exports spelled
them with Erf, and with Softplus and Tanh)."""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import register, unsupported


@register("Gelu", (20,))
def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    approximate = node.attributes.get("approximate", "none")
    approximate = approximate.decode() if isinstance(approximate, bytes) else approximate
    if approximate not in ("none", "tanh"):
        raise unsupported(node, f"approximate={approximate!r} (ONNX defines none and tanh)")
    return OperationConverterResult(torch_module=nn.GELU(approximate=approximate), onnx_mapping=onnx_mapping_from_node(node))


@register("Mish", (18,))
def _mish(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(torch_module=nn.Mish(), onnx_mapping=onnx_mapping_from_node(node))
