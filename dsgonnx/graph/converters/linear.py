"""MatMul by a constant matrix as an ``nn.Linear``: exporters write ``nn.Linear`` on inputs of
more than two dimensions (a transformer's tokens) as MatMul + Add, and ORT quantizes the
MatMul's weight like a Gemm's. Held as a Linear module (weight Bᵀ, no bias), the layer is one
reconstruction and QAT can refine; other MatMuls stay onnx2torch's."""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult
from torch import nn

from ._common import wrap_existing


def _by_constant_matrix(node: OnnxNode, graph: OnnxGraph) -> bool:
    inputs = node.input_values
    if len(inputs) != 2 or inputs[1] not in graph.initializers:
        return False
    weight = graph.initializers[inputs[1]].to_torch()
    return weight.dim() == 2 and weight.is_floating_point()


@wrap_existing("MatMul", (1, 9, 13), handles=_by_constant_matrix)
def _matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    weight = graph.initializers[node.input_values[1]].to_torch()
    layer = nn.Linear(weight.shape[0], weight.shape[1], bias=False, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.T)
    return OperationConverterResult(torch_module=layer,
                                    onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values))
