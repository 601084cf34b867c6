"""Op versions whose only change is wider type support (bfloat16, int4, float8...).

Their semantics on the float32/int64 tensors of an image classifier are those of the
latest version onnx2torch converts, so they reuse that converter. Versions that add an
attribute are accepted here only while the attribute keeps its old meaning (checked).
"""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import delegate, existing_converter, register, unsupported

# op type -> (onnx2torch version to reuse, newer versions that only widen types)
TYPE_ONLY = {
    "Acos": (7, (22,)),
    "Asin": (7, (22,)),
    "Atan": (7, (22,)),
    "Cos": (7, (22,)),
    "Sin": (7, (22,)),
    "Tan": (7, (22,)),
    "Celu": (12, (28,)),
    "Constant": (13, (19, 21, 23, 24, 25)),
    "ConstantOfShape": (9, (20, 21, 23, 24, 25)),
    "Conv": (11, (22,)),
    "ConvTranspose": (11, (22,)),
    "DepthToSpace": (13, (28,)),
    "Dropout": (13, (22,)),
    "Einsum": (12, (28,)),
    "Elu": (6, (22,)),
    "Equal": (13, (19,)),
    "EyeLike": (9, (22,)),
    "Flatten": (13, (21, 23, 24, 25)),
    "GlobalAveragePool": (1, (22,)),
    "GreaterOrEqual": (12, (16,)),
    "LessOrEqual": (12, (16,)),
    "HardSigmoid": (6, (22,)),
    "HardSwish": (14, (22,)),
    "Identity": (16, (19, 21, 23, 24, 25)),
    "InstanceNormalization": (6, (22,)),
    "IsInf": (10, (20,)),
    "IsNaN": (13, (20,)),
    "MaxPool": (12, (22,)),
    "Mod": (13, (28,)),
    "RoiAlign": (16, (22,)),
    "Round": (11, (22,)),
    "ScatterND": (16, (18,)),
    "Selu": (6, (22,)),
    "Shape": (15, (19, 21, 23, 24, 25)),
    "Softplus": (1, (22,)),
    "Softsign": (1, (22,)),
    "Squeeze": (21, (23, 24, 25)),
    "TopK": (11, (24,)),
    "Transpose": (13, (21, 23, 24, 25)),
    "Unsqueeze": (13, (21, 23, 24, 25)),
}


def _reuse(op_type: str, base_version: int):
    existing_converter(op_type, base_version)  # fail at import if onnx2torch moved it

    def convert(node: OnnxNode, graph: OnnxGraph):
        return delegate(node, graph, base_version)

    return convert


for _op, (_base, _versions) in TYPE_ONLY.items():
    register(_op, _versions)(_reuse(_op, _base))


@register("AveragePool", (19, 22))
def _average_pool(node: OnnxNode, graph: OnnxGraph):
    # 19 added `dilations`; with all dilations 1 it is AveragePool-11.
    if any(d != 1 for d in node.attributes.get("dilations", [])):
        raise unsupported(node, "dilated average pooling is not supported")
    return delegate(node, graph, 11)


@register("Range", (27,))
def _range(node: OnnxNode, graph: OnnxGraph):
    # `stash_type` only sets the accumulation precision of float ranges.
    return delegate(node, graph, 11)
