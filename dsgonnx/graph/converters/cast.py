"""Cast-19+ and CastLike (torch's dynamo exporter emits CastLike when not optimising)."""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import delegate, register


class OnnxCastLike(nn.Module, OnnxToTorchModule):
    """Cast ``input`` to the dtype of ``target_type``."""

    def forward(self, input_tensor: torch.Tensor, target_type: torch.Tensor) -> torch.Tensor:
        return input_tensor.to(target_type.dtype)


@register("Cast", (19, 21, 23, 24, 25))
def _cast(node: OnnxNode, graph: OnnxGraph):
    # `saturate` (19+) and `round_mode` (24+) only affect casts to float8/float4 types,
    # which onnx2torch's Cast converter rejects by itself.
    return delegate(node, graph, 13)


@register("CastLike", (15, 19, 21, 23, 24, 25))
def _cast_like(node: OnnxNode, graph: OnnxGraph):
    return OperationConverterResult(OnnxCastLike(), onnx_mapping_from_node(node))
