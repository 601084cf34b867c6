"""Reshape-5..25, including ``allowzero=1`` (what torch's dynamo exporter emits).

With ``allowzero=1`` a 0 in the shape means a zero-sized dimension instead of "copy the
input dimension". onnx2torch rejects it; here it is converted exactly.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import register, wrap_existing


class OnnxReshapeAllowZero(nn.Module, OnnxToTorchModule):
    """Reshape where 0 means 0 (``allowzero=1``); -1 is still inferred."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(input_tensor, [int(d) for d in shape.tolist()])


class OnnxReshapeCopyZero(nn.Module, OnnxToTorchModule):
    """Reshape where 0 copies the input dimension (``allowzero=0``, the ONNX default)."""

    def forward(self, input_tensor: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        dims = [input_tensor.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
        return torch.reshape(input_tensor, dims)


def _allows_zero(node: OnnxNode, graph: OnnxGraph | None = None) -> bool:
    return node.attributes.get("allowzero", 0) == 1


@wrap_existing("Reshape", (14,), handles=_allows_zero)
@register("Reshape", (19, 21, 23, 24, 25))
def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    module = OnnxReshapeAllowZero() if _allows_zero(node) else OnnxReshapeCopyZero()
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))
