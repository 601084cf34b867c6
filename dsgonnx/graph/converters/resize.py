"""Resize-18/19: new attributes that onnx2torch's Resize-13 converter does not model.

With their defaults (no antialiasing, ``stretch`` aspect policy, all axes) the op is
Resize-13; anything else is refused by name rather than converted approximately.
"""

from __future__ import annotations

from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode

from ._common import delegate, register, unsupported


@register("Resize", (18, 19))
def _resize(node: OnnxNode, graph: OnnxGraph):
    attrs = node.attributes
    if attrs.get("antialias", 0):
        raise unsupported(node, "antialias=1 is not supported")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise unsupported(node, f"keep_aspect_ratio_policy={attrs['keep_aspect_ratio_policy']!r} is not supported")
    if attrs.get("axes"):
        raise unsupported(node, "the axes attribute is not supported")
    if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise unsupported(node, "coordinate_transformation_mode='half_pixel_symmetric' is not supported")
    return delegate(node, graph, 13)
