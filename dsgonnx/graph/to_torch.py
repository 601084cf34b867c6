"""Convert a loaded ONNX classifier into an eval-mode, differentiable torch graph.

onnx2torch does the conversion, extended by :mod:`dsgonnx.graph.converters` for the op
versions it lacks; :func:`check_parity` proves the result against ONNX Runtime.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from operator import getitem
from typing import Optional

import numpy as np
import onnx
import torch
from onnx2torch.onnx_graph import OnnxGraph, ValueType
from onnx2torch.utils.safe_shape_inference import safe_shape_inference
from torch import fx, nn

from ..errors import DataError, ParityError, UnsupportedModelError
from ..runtime import ort_session, run_model
from . import normalize
from .converters import register_all
from .converters._common import lookup
from .onnx_io import LoadedModel, opset_of


@dataclass
class TorchModel:
    """The torch twin of a loaded ONNX model."""

    module: fx.GraphModule
    loaded: LoadedModel
    graph: onnx.ModelProto  # the normalised ONNX graph the module was built from
    module_names: dict[str, str]  # ONNX node name -> torch submodule name
    dtype: torch.dtype  # what the torch module computes in (float16 models run in float32)

    def __call__(self, images: torch.Tensor):
        return self.module(images)

    def submodule(self, onnx_node_name: str) -> torch.nn.Module:
        return self.module.get_submodule(self.module_names[onnx_node_name])

    def value_nodes(self) -> dict[str, fx.Node]:
        """ONNX value name -> the fx node computing it (graph inputs and node outputs)."""
        nodes = {node.name: node for node in self.module.graph.nodes}
        return {name: nodes[node] for name, node in self.module.meta["onnx_values"].items() if node in nodes}

    def constant_nodes(self) -> dict[str, fx.Node]:
        """ONNX initializer name -> the fx ``get_attr`` node reading it, for the initializers
        the converters take as inputs (the others are held inside the converted modules)."""
        nodes = {node.name: node for node in self.module.graph.nodes}
        return {name: nodes[node] for name, node in self.module.meta["onnx_constants"].items() if node in nodes}


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    samples: int
    worst_output: str
    per_output: dict[str, float]
    classes: int = 0  # values per sample of the first output as ONNX Runtime computed it

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``device`` setting: ``auto`` is CUDA when torch sees a usable
    GPU, else the CPU; ``cuda`` without one is a DataError."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DataError("`device` cuda: no usable CUDA device (torch.cuda.is_available() is False)")
        return torch.device("cuda")
    return torch.device("cpu")


def to_torch(loaded: LoadedModel) -> TorchModel:
    """Convert ``loaded`` to torch (eval mode). Unsupported ops raise a one-line error
    naming the op, its version and the node."""
    register_all()
    graph = normalize.for_torch(loaded.model)
    try:
        module = build_module(graph)
    except Exception as exc:  # onnx2torch raises bare NotImplementedError/KeyError/...
        raise _conversion_error(graph, exc) from None
    module.eval()  # onnx2torch returns train mode; BN must use its running statistics
    names = module.meta["module_names"]
    float_params = [p.dtype for p in module.parameters() if p.is_floating_point()]
    float_params += [b.dtype for b in module.buffers() if b.is_floating_point()]
    dtype = torch.float64 if float_params and all(d == torch.float64 for d in float_params) else torch.float32
    return TorchModel(module=module, loaded=loaded, graph=graph, module_names=names, dtype=dtype)


class _Initializers(nn.Module):
    """Holds the graph's initializers as buffers (``initializers.onnx_initializer_<i>``)."""


def build_module(model: onnx.ModelProto) -> fx.GraphModule:
    """An fx graph of ``model`` built from onnx2torch's converter modules, each found by
    :func:`~dsgonnx.graph.converters._common.lookup` (dsgonnx's converters first). Modules
    are named by onnx2torch's unique node names; graph inputs become ``input_<i>``."""
    model = safe_shape_inference(model)
    if model.ir_version < 3:
        raise NotImplementedError("ONNX IR version below 3 is not supported")
    initializer_names = {t.name for t in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in initializer_names]
    del model.graph.input[:]
    model.graph.input.extend(real_inputs)
    opsets = {o.domain: o.version for o in model.opset_import}
    onnx_graph, module_names = onnx_graph_of(model.graph)
    graph, root, buffers = fx.Graph(), nn.Module(), _Initializers()
    root.add_module("initializers", buffers)
    values: dict[str, fx.Node] = {}  # ONNX value name -> fx node producing it
    for index, name in enumerate(onnx_graph.input_values, 1):
        values[name] = graph.placeholder(f"input_{index}")

    def fx_value(name: str) -> Optional[fx.Node]:
        kind = onnx_graph.value_type(name)
        if kind == ValueType.EMPTY:
            return None
        if kind == ValueType.GRAPH_INITIALIZER and name not in values:
            buffer = f"onnx_initializer_{len(buffers._buffers)}"
            buffers.register_buffer(buffer, onnx_graph.initializers[name].to_torch())
            values[name] = graph.get_attr(f"initializers.{buffer}")
        if name not in values:
            raise RuntimeError(f"value {name!r} is used before it is computed")
        return values[name]

    for unique, node in onnx_graph.nodes.items():
        module, mapping = lookup(node.operation_type, opsets[node.domain], node.domain)(node, onnx_graph)
        root.add_module(unique, module)
        args = [fx_value(name) for name in mapping.inputs]
        kwargs = {}
        if None in args:  # skipped optional inputs: pass the rest by keyword
            first = args.index(None)
            names = list(inspect.signature(module.forward).parameters)[first : len(args)]
            kwargs = {key: value for key, value in zip(names, args[first:]) if value is not None}
            args = args[:first]
        call = graph.call_module(unique, args=tuple(args), kwargs=kwargs)
        outputs = list(mapping.outputs)
        for position, name in enumerate(outputs):
            values[name] = call if len(node.output_values) == 1 else graph.call_function(getitem, (call, position))
    results = [values[name] for name in onnx_graph.output_values]
    graph.output(results[0] if len(results) == 1 else tuple(results))
    graph.lint()
    module = fx.GraphModule(root, graph)
    # which fx node computes each ONNX value (a simulation quantizes tensors by their ONNX names)
    module.meta["onnx_values"] = {name: node.name for name, node in values.items() if node.op != "get_attr"}
    # ... and which reads each initializer a converter takes as an input (others are held by the modules)
    module.meta["onnx_constants"] = {name: node.name for name, node in values.items() if node.op == "get_attr"}
    module.meta["module_names"] = module_names
    return module


def onnx_graph_of(graph: onnx.GraphProto) -> tuple[OnnxGraph, dict[str, str]]:
    """onnx2torch's view of ``graph``, one module name per node, and each ONNX node name's
    module name. onnx2torch names a module after its node (dots as slashes, the leading
    slash dropped) and numbers repeats ``_1``, ``_2``, ..., which can be another node's name:
    ORT's optimiser adds a node ``Gather`` beside an exporter's ``/Gather`` and ``/Gather_1``,
    two nodes become ``Gather_1`` and the graph loses one. Those nodes are renamed here (in a
    copy) to a free name; the map keeps their ONNX names."""
    generated = [OnnxGraph.generate_node_name(node) for node in graph.node]
    taken, used, renamed = set(generated), set(), {}
    for index, name in enumerate(generated):
        unique, count = name, 0
        while unique in used or (count and unique in taken):
            count += 1
            unique = f"{name}_{count}"
        used.add(unique)
        if unique != name:
            renamed[index] = unique
    original = graph
    if renamed:
        graph = copy.deepcopy(graph)
        for index, unique in renamed.items():
            node = graph.node[index]
            node.name = unique[len(node.domain) + 1:] if node.domain else unique
    onnx_graph = OnnxGraph(graph)
    assert len(onnx_graph.nodes) == len(graph.node), "one torch module per node"
    return onnx_graph, {node.name: unique for node, unique in zip(original.node, onnx_graph.nodes)}


def _conversion_error(graph: onnx.ModelProto, exc: Exception) -> UnsupportedModelError:
    """Find the node onnx2torch failed on by converting node by node."""
    opset = {o.domain or "": o.version for o in graph.opset_import}
    opset.setdefault("ai.onnx", opset.get("", 1))
    onnx_graph, _ = onnx_graph_of(graph.graph)
    for node in onnx_graph.nodes.values():
        domain = node.domain or ""
        version = opset.get(domain, opset[""])
        where = f"{node.operation_type} (opset {version}{', domain ' + domain if domain else ''}), node '{node.name}'"
        try:
            converter = lookup(node.operation_type, version, domain)
        except NotImplementedError:
            since = _since_version(node.operation_type, version, domain)
            return UnsupportedModelError(
                f"unsupported operator {node.operation_type}-{since} "
                f"(model opset {version}{', domain ' + domain if domain else ''}) at node '{node.name}'"
            )
        try:
            converter(node, onnx_graph)
        except Exception as node_exc:
            return UnsupportedModelError(f"cannot convert {where}: {_one_line(node_exc)}")
    return UnsupportedModelError(f"torch conversion failed: {type(exc).__name__}: {_one_line(exc)}")


def _since_version(op_type: str, opset: int, domain: str) -> int:
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except Exception:
        return opset


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _flatten_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    flat: list[torch.Tensor] = []
    for item in output:
        flat.extend(_flatten_outputs(item))
    return flat


def random_inputs(loaded: LoadedModel, count: int, seed: int = 0) -> np.ndarray:
    """Standard-normal NCHW inputs in float32 (the scale of normalised images); whole pixels
    0-255, uniform, for a model that takes uint8 pixels and normalises them itself."""
    rng = np.random.default_rng(seed)
    if loaded.takes_pixels:
        return rng.integers(0, 256, (count, *loaded.input.chw)).astype(np.float32)
    return rng.standard_normal((count, *loaded.input.chw)).astype(np.float32)


def run_torch(model: TorchModel, images: np.ndarray, batch: Optional[int] = None) -> list[np.ndarray]:
    """Run the torch model on float32 NCHW ``images``; returns each output as numpy."""
    batch = batch or _batch_for(model.loaded, len(images))
    results: list[list[np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk, count = _padded(images[start : start + batch], model.loaded)
            chunk = torch.from_numpy(chunk).to(model.dtype)
            results.append([t.detach().float().numpy()[:count] for t in _flatten_outputs(model(chunk))])
    return [np.concatenate(parts) for parts in zip(*results)]


def run_onnxruntime(loaded: LoadedModel, images: np.ndarray, batch: Optional[int] = None) -> list[np.ndarray]:
    """Run the original ONNX file in ONNX Runtime (CPU) on ``images``."""
    session = ort_session(loaded.path, shown_as=loaded.source)
    batch = batch or _batch_for(loaded, len(images))
    results = []
    for start in range(0, len(images), batch):
        chunk, count = _padded(images[start : start + batch].astype(loaded.input.dtype), loaded)
        outputs = run_model(session, {loaded.input.name: chunk}, loaded.source)
        results.append([np.asarray(o, dtype=np.float32)[:count] for o in outputs])
    return [np.concatenate(parts) for parts in zip(*results)]


def _batch_for(loaded: LoadedModel, count: int) -> int:
    return loaded.input.shape[0] or count


def _padded(chunk: np.ndarray, loaded: LoadedModel) -> tuple[np.ndarray, int]:
    """``chunk`` filled up with zero images to the model's fixed batch (if it has one), and
    how many of the rows are real."""
    fixed, count = loaded.input.fixed_batch, len(chunk)
    if fixed is None or count == fixed:
        return chunk, count
    return np.concatenate([chunk, np.zeros((fixed - count, *chunk.shape[1:]), chunk.dtype)]), count


def check_parity(model: TorchModel, samples: int = 4, seed: int = 0) -> ParityResult:
    """Compare torch with ONNX Runtime on ``samples`` random inputs.

    Tolerance: 2e-4 of the output's magnitude (at least 1) for float32 graphs, 5e-2 for
    float16 graphs, which ONNX Runtime computes in half precision. A conversion error
    (wrong attribute, layout, epsilon) shows up orders of magnitude above that. Raises :class:`ParityError` naming
    the worst output when it is exceeded.
    """
    images = random_inputs(model.loaded, samples, seed)
    reference = run_onnxruntime(model.loaded, images)
    try:
        converted = run_torch(model, images)
    except Exception as exc:  # attribute values the converters take literally (an axis of 2**40, ...)
        raise ParityError(f"the torch conversion cannot run {model.loaded.source.name} where ONNX Runtime can: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    names = model.loaded.output_names
    if len(converted) != len(reference):
        converted = converted[: len(reference)]
    rel = 5e-2 if model.loaded.input.dtype == np.float16 else 2e-4
    per_output: dict[str, float] = {}
    worst, worst_excess, tolerance = names[0], -np.inf, 0.0
    max_diff = 0.0
    for name, ref, got in zip(names, reference, converted):
        if ref.shape != got.shape:
            raise ParityError(f"torch conversion does not match ONNX Runtime: output '{name}' has shape "
                              f"{tuple(got.shape)} in torch but {tuple(ref.shape)} in ONNX Runtime")
        diff = float(np.max(np.abs(ref.astype(np.float64) - got))) if ref.size else 0.0
        tol = rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
        per_output[name] = diff
        if diff - tol > worst_excess:
            worst, worst_excess, tolerance = name, diff - tol, tol
        max_diff = max(max_diff, diff)
    first_ref, first_got = reference[0].reshape(samples, -1), converted[0].reshape(samples, -1)
    agreement = float(np.mean(first_ref.argmax(1) == first_got.argmax(1)))
    result = ParityResult(max_diff, tolerance, agreement, samples, worst, per_output, first_ref.shape[1])
    if worst_excess > 0:
        raise ParityError(
            f"torch conversion does not match ONNX Runtime: output '{worst}' differs by up to "
            f"{per_output[worst]:.4g} (tolerance {tolerance:.3g}) on {samples} random inputs"
        )
    return result


__all__ = ["TorchModel", "ParityResult", "build_module", "resolve_device", "to_torch", "check_parity", "run_torch", "run_onnxruntime", "opset_of"]
