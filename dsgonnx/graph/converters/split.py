"""Split-18: adds ``num_outputs`` (uneven last chunk allowed) beside the ``split`` input."""

from __future__ import annotations

from typing import Optional

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import const_input, register


class OnnxSplit18(nn.Module, OnnxToTorchModule):
    """Split into explicit sizes, or into ``num_outputs`` chunks of ceil(len / n)."""

    def __init__(self, axis: int, num_outputs: int, sizes: Optional[list[int]]):
        super().__init__()
        self.axis = axis
        self.num_outputs = num_outputs
        self.sizes = sizes

    def forward(self, input_tensor: torch.Tensor, split: Optional[torch.Tensor] = None):
        if split is not None:
            sizes = [int(s) for s in split.tolist()]
        elif self.sizes is not None:
            sizes = self.sizes
        else:
            length = input_tensor.shape[self.axis]
            chunk = -(-length // self.num_outputs)  # ceil: ONNX puts the remainder last
            sizes = [chunk] * (length // chunk) + ([length % chunk] if length % chunk else [])
        return tuple(torch.split(input_tensor, sizes, dim=self.axis))


@register("Split", (18,))
def _split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = node.attributes.get("axis", 0)
    num_outputs = node.attributes.get("num_outputs", len(node.output_values))
    sizes = const_input(node, graph, 1)
    if sizes is not None or len(node.input_values) < 2 or not node.input_values[1]:
        static = None if sizes is None else [int(s) for s in torch.as_tensor(sizes).tolist()]
        module = OnnxSplit18(axis, num_outputs, static)
        return OperationConverterResult(module, OnnxMapping(inputs=node.input_values[:1], outputs=node.output_values))
    return OperationConverterResult(OnnxSplit18(axis, num_outputs, None), onnx_mapping_from_node(node))
