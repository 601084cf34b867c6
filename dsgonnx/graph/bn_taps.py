"""BatchNorm layers: their stored statistics (the target) and hooks on their inputs (the probe).

The running mean/var of each BatchNormalization node are the only "data" a data-free
method has. onnx2torch turns a BN node into ``nn.BatchNorm2d`` when its parameters are
initializers and into a functional module otherwise; both are handled here.

Some writers decompose BN into elementwise ops with per-channel constants. What such a
pattern still carries is used: ``Sub(x, μ)`` then ``Div(·, d)`` is a BN with mean μ and
variance d² (ε = 0, kind ``decomposed``); ``Sub(x, μ)`` then ``Mul(·, s)`` keeps only the
mean (s = γ/√(σ²+ε) cannot be split; kind ``decomposed-mean``, variance NaN: the losses
match the mean alone). ``Mul`` + ``Add`` alone is an affine layer with no statistics. The
graph input is never taken for a layer (an embedded input normalisation is not a BN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from .normalize import channel_constant
from .to_torch import TorchModel


@dataclass(frozen=True)
class BNLayer:
    """One BatchNormalization node: ONNX name, the torch module that runs it, statistics."""

    name: str
    module_name: str
    channels: int
    running_mean: np.ndarray
    running_var: np.ndarray  # NaN where the graph does not say it (kind decomposed-mean)
    eps: float
    kind: str = "batchnorm"  # or "decomposed", "decomposed-mean" (see the module docstring)

    @property
    def has_variance(self) -> bool:
        return bool(np.isfinite(self.running_var).all())


def find_bn_layers(model: TorchModel) -> list[BNLayer]:
    """Every BN node of ``model`` in graph order, with its statistics."""
    graph = model.graph.graph
    initializers = {t.name: t for t in graph.initializer}
    layers = []
    missing = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        module_name = model.module_names[node.name]
        module = model.module.get_submodule(module_name)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            mean, var = module.running_mean.detach().cpu().numpy(), module.running_var.detach().cpu().numpy()
        elif node.input[3] in initializers and node.input[4] in initializers:
            mean = numpy_helper.to_array(initializers[node.input[3]])
            var = numpy_helper.to_array(initializers[node.input[4]])
        else:
            missing.append((node, module_name, eps))
            continue
        layers.append(_layer(node.name, module_name, mean, var, eps))
    if missing:
        layers = _with_computed_statistics(model, layers, missing)
    layers += _decomposed_layers(model)
    order = {n.name: i for i, n in enumerate(graph.node)}
    return sorted(layers, key=lambda layer: order[layer.name])


def _decomposed_layers(model: TorchModel) -> list[BNLayer]:
    """BN decomposed into Sub(μ) then Div(√var) or Mul(scale) (see the module docstring)."""
    graph = model.graph.graph
    initializers = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    layers = []
    for node in graph.node:
        if node.op_type != "Sub" or len(node.input) != 2 or node.name not in model.module_names:
            continue
        x, centre = node.input
        if x in initializers or x in inputs or centre not in initializers:
            continue
        mean = channel_constant(initializers[centre])
        after = users.get(node.output[0], [])
        if mean is None or len(after) != 1 or after[0].op_type not in ("Div", "Mul") or after[0].input[0] != node.output[0]:
            continue
        factor = after[0].input[1]
        values = channel_constant(initializers[factor]) if factor in initializers else None
        if values is None or values.shape != mean.shape or (after[0].op_type == "Div" and (values == 0).any()):
            continue
        if after[0].op_type == "Div":
            layers.append(_layer(node.name, model.module_names[node.name], mean, values**2, 0.0, "decomposed"))
        else:
            layers.append(_layer(node.name, model.module_names[node.name], mean, np.full_like(mean, np.nan), 0.0,
                                 "decomposed-mean"))
    return layers


def _layer(name: str, module_name: str, mean, var, eps: float, kind: str = "batchnorm") -> BNLayer:
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    var = np.asarray(var, dtype=np.float32).reshape(-1)
    return BNLayer(name, module_name, int(mean.shape[0]), mean, var, float(eps), kind)


def _with_computed_statistics(model: TorchModel, layers: list[BNLayer], missing) -> list[BNLayer]:
    """BN statistics produced by other nodes: read them from one forward pass."""
    captured: dict[str, tuple] = {}
    handles = []
    for node, module_name, _ in missing:
        def hook(_module, args, _name=node.name):
            captured[_name] = (args[3].detach().cpu().numpy(), args[4].detach().cpu().numpy())

        handles.append(model.module.get_submodule(module_name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *model.loaded.input.chw), dtype=model.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return layers + [_layer(node.name, module_name, *captured[node.name], eps) for node, module_name, eps in missing]


# normalisations that keep no running statistics (a ViT's or ConvNeXt's LayerNorm, ...)
STATELESS_NORMS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
                   "SimplifiedLayerNormalization", "SkipLayerNormalization")


def stateless_norms(model: onnx.ModelProto) -> list[str]:
    """The normalisation ops of ``model`` that keep no running statistics, sorted."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in STATELESS_NORMS})


def bn_folded(model: onnx.ModelProto) -> bool:
    """True when the graph has no BN nodes but Conv layers with a bias: the signature of
    BN folded into Conv (torch.onnx.export's default, ORT's optimiser, quant_pre_process) —
    unless it normalises otherwise (LayerNorm: a ViT's patch embedding has a bias too)."""
    ops = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    return (not ops and not stateless_norms(model)
            and any(n.op_type == "Conv" and len(n.input) > 2 and n.input[2] for n in model.graph.node))


class BNProbe:
    """Forward pre-hooks that hand each BN layer's input to ``callback(layer, tensor)``.

    Works for ``nn.BatchNorm2d`` and onnx2torch's functional BN alike (the input is the
    first positional argument of both). Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: TorchModel, layers: list[BNLayer], callback: Callable[[BNLayer, torch.Tensor], None]):
        self._handles = []
        for layer in layers:
            def hook(_module, args, _layer=layer):
                callback(_layer, args[0])

            self._handles.append(model.module.get_submodule(layer.module_name).register_forward_pre_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "BNProbe":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.remove()
        return None


class _Reached(Exception):
    """Stops a forward pass at the layer it was run for."""


def first_bn_gap(model: TorchModel, images: np.ndarray) -> Optional[tuple[str, float]]:
    """How far ``images`` sit from what the model's first BN layer (with a variance) saw in
    training: the per-channel mean and std of its input over all the images, each gap in units
    of the running std, squared and averaged over channels, the two summed (``(name, gap)``;
    None without such a layer). The forward pass stops at that layer. Images preprocessed as
    in training sit well under 1 on the benchmark models; unnormalised pixels thousands."""
    layer = next((layer for layer in find_bn_layers(model) if layer.has_variance), None)
    if layer is None:
        return None
    seen = []

    def reached(_layer, tensor):
        seen.append(tensor.detach().float())
        raise _Reached

    with torch.no_grad(), BNProbe(model, [layer], reached):
        try:
            model.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        except _Reached:
            pass
    if not seen:  # (a layer the forward pass does not reach)
        return None
    x = seen[0].transpose(0, 1).reshape(layer.channels, -1).double()
    std = np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    mean_gap = (x.mean(1).numpy() - layer.running_mean) / std
    std_gap = (x.std(1, unbiased=False).numpy() - std) / std
    return layer.name, float(np.mean(mean_gap ** 2) + np.mean(std_gap ** 2))
