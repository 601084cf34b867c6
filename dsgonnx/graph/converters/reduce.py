"""Reduce*-18 and later: ``axes`` moved from an attribute to an optional input.

Torch's dynamo exporter writes ``ReduceMean(x, axes)`` at opset 18+ (e.g. for
``x.mean((2, 3))``), which onnx2torch cannot convert.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import const_input, register

Reduction = Callable[[torch.Tensor, Sequence[int], bool], torch.Tensor]


def _prod(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdim)
    return x


_REDUCTIONS: dict[str, Reduction] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "ReduceProd": _prod,
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
}

_VERSIONS = {
    "ReduceMean": (18,),
    "ReduceMax": (18, 20),
    "ReduceMin": (18, 20),
    "ReduceProd": (18,),
    "ReduceL1": (18,),
    "ReduceL2": (18,),
    "ReduceLogSum": (18, 28),
    "ReduceLogSumExp": (18, 28),
    "ReduceSumSquare": (18,),
}


class OnnxReduceAxesInput(nn.Module, OnnxToTorchModule):
    """One ONNX reduction; ``axes`` fixed at conversion or given as a tensor at run time."""

    def __init__(self, op_type: str, axes: Optional[list[int]], keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.op_type = op_type
        self.axes = axes
        self.keepdims = keepdims
        self.noop_with_empty_axes = noop_with_empty_axes

    def forward(self, input_tensor: torch.Tensor, axes: Optional[torch.Tensor] = None) -> torch.Tensor:
        dims = self.axes if axes is None else [int(a) for a in axes.tolist()]
        if not dims:
            if self.noop_with_empty_axes:
                return input_tensor
            dims = list(range(input_tensor.dim()))
        dims = sorted({d % input_tensor.dim() for d in dims}) if input_tensor.dim() else []
        if not dims:
            return input_tensor
        return _REDUCTIONS[self.op_type](input_tensor, dims, self.keepdims)


def _convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keepdims = node.attributes.get("keepdims", 1) == 1
    noop = node.attributes.get("noop_with_empty_axes", 0) == 1
    axes_value = const_input(node, graph, 1)
    if len(node.input_values) < 2 or not node.input_values[1] or axes_value is not None:
        axes = [] if axes_value is None else [int(a) for a in torch.as_tensor(axes_value).flatten().tolist()]
        module = OnnxReduceAxesInput(node.operation_type, axes, keepdims, noop)
        return OperationConverterResult(module, OnnxMapping(inputs=node.input_values[:1], outputs=node.output_values))
    module = OnnxReduceAxesInput(node.operation_type, None, keepdims, noop)
    return OperationConverterResult(module, onnx_mapping_from_node(node))


for _op, _versions in _VERSIONS.items():
    register(_op, _versions)(_convert)
