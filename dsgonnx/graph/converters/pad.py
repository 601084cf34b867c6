"""Pad-18 and later: optional ``axes`` input (18) and ``wrap`` mode (19)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import const_input, has_input, register, unsupported

_TORCH_MODE = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class OnnxPad18(nn.Module, OnnxToTorchModule):
    """ONNX Pad with explicit axes; pads/value/axes may be tensors given at run time."""

    def __init__(self, mode: str, axes: Optional[list[int]]):
        super().__init__()
        self.mode = _TORCH_MODE[mode]
        self.axes = axes

    def forward(
        self,
        data: torch.Tensor,
        pads: torch.Tensor,
        constant_value: Optional[torch.Tensor] = None,
        axes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        rank = data.dim()
        axis_list = [int(a) for a in axes.tolist()] if axes is not None else self.axes
        axis_list = list(range(rank)) if axis_list is None else [a % rank for a in axis_list]
        pad_values = [int(p) for p in pads.tolist()]
        begins = dict(zip(axis_list, pad_values[: len(axis_list)]))
        ends = dict(zip(axis_list, pad_values[len(axis_list) :]))
        # torch wants (last_begin, last_end, ..., first_begin, first_end), trailing axes only
        padded_axes = [a for a in range(rank) if begins.get(a, 0) or ends.get(a, 0)]
        if not padded_axes:
            return data
        first = min(padded_axes)
        if self.mode != "constant" and (first < 2 or rank - first > 3):
            raise RuntimeError(f"{self.mode} padding only works on the 1-3 trailing spatial axes")
        torch_pads: list[int] = []
        for axis in range(rank - 1, first - 1, -1):
            torch_pads += [begins.get(axis, 0), ends.get(axis, 0)]
        if self.mode == "constant":
            value = 0.0 if constant_value is None or constant_value.numel() == 0 else float(constant_value)
            return F.pad(data, torch_pads, mode="constant", value=value)
        return F.pad(data, torch_pads, mode=self.mode)


@register("Pad", (18, 19, 21, 23, 24, 25))
def _pad(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = node.attributes.get("mode", "constant")
    if mode not in _TORCH_MODE:
        raise unsupported(node, f"pad mode {mode!r} is not supported")
    axes = const_input(node, graph, 3)
    if has_input(node, 3) and axes is None:
        return OperationConverterResult(OnnxPad18(mode, None), onnx_mapping_from_node(node))
    static_axes = None if axes is None else [int(a) for a in torch.as_tensor(axes).flatten().tolist()]
    mapping = onnx_mapping_from_node(node)
    mapping = mapping._replace(inputs=mapping.inputs[:3])
    return OperationConverterResult(OnnxPad18(mode, static_axes), mapping)
