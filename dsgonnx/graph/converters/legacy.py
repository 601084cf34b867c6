"""Opset 1-7 versions onnx2torch skips, as found in old vendor graphs (e.g. opset-7 Caffe2
exports): MaxPool-1, AveragePool-1, Dropout-1/6/7, BatchNormalization-6/7, Gemm-6/7, Flatten-1, Slice-1,
Sum/Max/Min/Mean-6. Each maps onto a newer version with the same inference semantics.
"""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

from ._common import delegate, register, unsupported


@register("MaxPool", (1,))
def _max_pool(node: OnnxNode, graph: OnnxGraph):
    # MaxPool-8 added storage_order and the optional Indices output; both absent here.
    return delegate(node, graph, 8)


@register("AveragePool", (1,))
def _average_pool(node: OnnxNode, graph: OnnxGraph):
    # AveragePool-7 added count_include_pad, whose default (0) is AveragePool-1's behaviour.
    return delegate(node, graph, 7)


class OnnxDropoutInference(nn.Module, OnnxToTorchModule):
    """Old Dropout at inference: identity, plus an all-true mask when the node lists one."""

    def __init__(self, with_mask: bool):
        super().__init__()
        self.with_mask = with_mask

    def forward(self, data: torch.Tensor):
        return (data, torch.ones_like(data, dtype=torch.bool)) if self.with_mask else data


@register("Dropout", (1, 6, 7))
def _dropout(node: OnnxNode, graph: OnnxGraph):
    # Versions 1/6 carry is_test, 7 only ratio; none changes the inference data path.
    with_mask = len(node.output_values) > 1 and bool(node.output_values[1])
    return OperationConverterResult(OnnxDropoutInference(with_mask), onnx_mapping_from_node(node))


@register("BatchNormalization", (6, 7))
def _batch_norm(node: OnnxNode, graph: OnnxGraph):
    if node.attributes.get("spatial", 1) != 1:
        raise unsupported(node, "spatial=0 (per-activation statistics) is not supported")
    if len([o for o in node.output_values if o]) > 1:
        raise unsupported(node, "training-mode outputs (running mean/var) are not supported")
    return delegate(node, graph, 9)


@register("Gemm", (6, 7))
def _gemm(node: OnnxNode, graph: OnnxGraph):
    # Gemm-6's `broadcast` flag became implicit unidirectional broadcasting in 7.
    return delegate(node, graph, 9)


def _variadic(node: OnnxNode, graph: OnnxGraph):
    # Version 6 required equal shapes; version 8 broadcasts, a superset.
    return delegate(node, graph, 8)


for _op in ("Sum", "Max", "Min", "Mean"):
    register(_op, (6,))(_variadic)


@register("Flatten", (1,))
def _flatten(node: OnnxNode, graph: OnnxGraph):
    # Flatten-9 only widened the types.
    return delegate(node, graph, 9)


class OnnxSliceAttributes(nn.Module, OnnxToTorchModule):
    """Slice-1: starts/ends/axes as attributes, step 1, ends clamped like ONNX."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int] | None):
        super().__init__()
        self.starts, self.ends = starts, ends
        self.axes = axes if axes is not None else list(range(len(starts)))

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        index = [slice(None)] * data.dim()
        for axis, start, end in zip(self.axes, self.starts, self.ends):
            index[axis % data.dim()] = slice(start, end)
        return data[tuple(index)]


@register("Slice", (1,))
def _slice(node: OnnxNode, graph: OnnxGraph):
    # Attribute-based Slice (opsets 1-9). onnx2torch files a converter for it under
    # version 9 (never an ONNX version, so unreachable) that also fails on list attributes.
    attrs = node.attributes
    module = OnnxSliceAttributes(list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes"))
    return OperationConverterResult(module, onnx_mapping_from_node(node))
