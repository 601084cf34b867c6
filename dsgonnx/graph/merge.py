"""One graph that runs several classifiers on the same input, for synthesis against all of
their BN statistics at once (MixMix's feature mixing, Li et al., ICCV 2021).

:func:`with_companions` puts each companion model's nodes beside the main model's, every name
prefixed, all reading the main model's input; the main model's outputs come first, so whatever
reads the first output (cross-entropy, the classes) reads the main model's. The companions
must take the same images: the same channels and size, floats, and (the caller's word) the
same preprocessing.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import onnx
from onnx import compose, helper, version_converter

from ..errors import InputSpecError, UnsupportedModelError
from .onnx_io import LoadedModel, load_model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _at_opset(loaded: LoadedModel, opset: int) -> onnx.ModelProto:
    if _opset(loaded.model) == opset:
        return loaded.model
    try:
        return version_converter.convert_version(loaded.model, opset)
    except Exception as error:  # noqa: BLE001 - the converter's own reasons, in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnsupportedModelError(f"{loaded.source.name} (opset {_opset(loaded.model)}) could not be converted to "
                                    f"opset {opset}, its companions': {reason}") from None


def with_companions(main: LoadedModel, paths: Sequence[str]) -> LoadedModel:
    """``main`` with every model at ``paths`` run beside it on its input (one graph); ``file``,
    ``sha256`` and the input's description stay ``main``'s. One-line errors for a companion
    that cannot be read or takes other images, and for graphs that cannot all be brought to
    the newest opset among them."""
    if main.takes_pixels:
        raise UnsupportedModelError(f"{main.source.name} takes whole pixels ({main.file_dtype}); synthesis "
                                    "against companion models needs a model that takes float images")
    companions = []
    for path in paths:
        other = load_model(path)
        if other.takes_pixels or other.input.chw != main.input.chw:
            shape = "whole pixels" if other.takes_pixels else "×".join(map(str, other.input.chw))
            raise InputSpecError(f"companion model {other.source.name} takes {shape} images, "
                                 f"{main.source.name} {'×'.join(map(str, main.input.chw))} floats: synthesis "
                                 "against both needs the same images")
        companions.append(other)
    # every graph at the newest opset among them (onnx converts up, not always down)
    opset = max(_opset(m.model) for m in (main, *companions))
    base = _at_opset(main, opset)
    nodes, initializers, values = list(base.graph.node), list(base.graph.initializer), list(base.graph.value_info)
    outputs = list(base.graph.output)
    image = next(i for i in base.graph.input if i.name == main.input.name)
    domains = {o.domain: o.version for o in base.opset_import}
    for number, other in enumerate(companions, 1):
        proto = compose.add_prefix(_at_opset(other, opset), f"mix{number}_")
        own_input = f"mix{number}_{other.input.name}"
        for node in proto.graph.node:
            node.input[:] = [main.input.name if name == own_input else name for name in node.input]
        nodes += proto.graph.node
        initializers += proto.graph.initializer
        values += proto.graph.value_info
        outputs += proto.graph.output
        for o in proto.opset_import:
            domains.setdefault(o.domain, o.version)
    graph = helper.make_graph(nodes, f"{base.graph.name or 'main'}+{len(paths)}", [image], outputs, initializers,
                              value_info=values)
    # the newest IR among them (4 at least: the graph lists no weights among its inputs)
    merged = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains.items()],
                               ir_version=max(4, *(m.model.ir_version for m in (main, *companions))))
    with tempfile.TemporaryDirectory(prefix="dsgonnx-mix-") as folder:
        file = Path(folder) / main.source.name
        onnx.save(merged, str(file), save_as_external_data=merged.ByteSize() > 2**31 - 2**24)
        loaded = load_model(file)
    return replace(loaded, file=main.source, sha256=main.sha256)
