"""The torch simulation of a QDQ model: the float model with exactly the exported quantization.

:func:`insert_activation_quant` puts an :class:`~.quantizers.ActQuant` after every tensor the
QDQ model quantizes (:func:`dsgonnx.quant.placement.read_placement`: the model input, layer
inputs and outputs, both inputs of a residual Add, pooled features, ...), on its exported
grid, and :func:`insert_constant_quant` makes every other constant input ORT quantizes (a
MatMul's weight, a LayerNormalization's scale and bias, an Add's constant, a Conv weight left
unrefined, ...) read its exported values. Reconstruction trains on that graph, so the loss it
minimises is the deployed model's.
:func:`simulate_qdq` also loads the exported weights and biases (their integers times their
scales) into the float model's layers: its logits are the QDQ model's up to the order of
float additions (ORT's integer kernels round once per output where the simulation rounds
float sums) — :func:`fidelity` measures how close.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn
from torch.nn.utils import parametrize

from ..errors import UnsupportedModelError
from ..graph.onnx_io import load_model
from ..graph.to_torch import TorchModel, to_torch
from ..quant.placement import Grid, Placement, read_placement
from ..quant.qdq import quantized_weights
from .quantizers import ActQuant, ConstQuant

LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def layer_module(module: nn.Module, target: Optional[str]) -> tuple[nn.Module, str, Optional[nn.Module]]:
    """(parent, attribute, layer) of the Conv/Linear a converted node computes with; onnx2torch
    puts explicit padding in front of some convs, inside a Sequential. ``layer`` is None when
    the node is not such a module."""
    if not target:
        return module, "", None
    inner = module.get_submodule(target)
    parent, attr = module, target
    if isinstance(inner, nn.Sequential):
        children = [(k, c) for k, c in inner.named_children() if isinstance(c, LAYER_TYPES)]
        if len(children) == 1:
            parent, attr, inner = inner, children[0][0], children[0][1]
    return parent, attr, inner if isinstance(inner, LAYER_TYPES) else None


def insert_activation_quant(torch_model: TorchModel, grids: dict[str, Grid]) -> tuple[dict[str, ActQuant], list[str]]:
    """Quantize each tensor of ``grids`` (ONNX names) in the fx graph: every reader of the
    tensor reads it through an ActQuant. Returns ONNX name -> ActQuant, and the names the
    graph does not compute (none for a QDQ model of this float model)."""
    module = torch_model.module
    nodes = torch_model.value_nodes()
    quantizers: dict[str, ActQuant] = {}
    missing = []
    for name, grid in grids.items():
        node = nodes.get(name)
        if node is None:
            missing.append(name)
            continue
        target = f"dsgonnx_actq_{len(quantizers)}"
        quantizer = ActQuant(grid.scale, grid.zero_point, grid.low, grid.high)
        module.add_module(target, quantizer)
        with module.graph.inserting_after(node):
            inserted = module.graph.call_module(target, (node,))
        node.replace_all_uses_with(inserted, delete_user_cb=lambda user: user is not inserted)
        quantizers[name] = quantizer
    module.graph.lint()
    module.recompile()
    return quantizers, missing


def _held_tensor(module: nn.Module, values: np.ndarray) -> Optional[tuple[nn.Module, str, bool]]:
    """(owner, attribute, transposed) of the one parameter or buffer of ``module`` equal to
    ``values`` (a float initializer the converter took into the module: nn.LayerNorm's weight,
    a Conv's), or its transpose (a 2-D weight an nn.Linear holds); None unless exactly one."""
    wanted = torch.from_numpy(np.array(values, dtype=np.float32))
    found = []
    for _, owner in module.named_modules():
        tensors = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
        for attr, tensor in tensors:
            if tensor is None or not tensor.is_floating_point():
                continue
            held = tensor.detach().cpu().float()
            for transposed, target in ((False, wanted), (True, wanted.T if wanted.dim() == 2 else None)):
                if target is not None and held.shape == target.shape and torch.equal(held, target):
                    found.append((owner, attr, transposed))
                    break
    return found[0] if len(found) == 1 else None


def _const_quant(values: np.ndarray, input_quant: Optional[ActQuant], weight) -> ConstQuant:
    quant = ConstQuant(values)
    if input_quant is not None:
        quant.on_grid_of(input_quant, weight.scales)
    return quant


def insert_constant_quant(torch_model: TorchModel, placement: Placement, skip: set[tuple[str, int]],
                          activations: dict[str, ActQuant]) -> tuple[dict[fx.Node, list[ConstQuant]], set[tuple[str, int]]]:
    """Make every quantized constant input of ``placement`` (node name, input index) but those of
    ``skip`` (the layers simulated otherwise) read its exported values: a :class:`ConstQuant`
    in front of the reader where the converter takes the constant as an input, else a
    parametrization of the one equal tensor its module holds. An int32 bias follows the step
    of the reader's input in ``activations`` (ONNX name -> its ActQuant), which training may
    learn. Returns the fx node that evaluates each ConstQuant -> them (reconstruction switches
    them per unit), and the inputs simulated."""
    module = torch_model.module
    onnx_nodes = {node.name: node for node in torch_model.graph.graph.node}
    initializers = {t.name: t for t in torch_model.graph.graph.initializer}
    getters = torch_model.constant_nodes()
    calls = {str(node.target): node for node in module.graph.nodes if node.op == "call_module"}
    owners: dict[fx.Node, list[ConstQuant]] = {}
    simulated: set[tuple[str, int]] = set()
    for (node_name, index), constant in placement.constants.items():
        node = onnx_nodes.get(node_name)
        target = torch_model.module_names.get(node_name)
        reader = calls.get(target) if target else None
        if (node_name, index) in skip or node is None or reader is None or index >= len(node.input):
            continue
        name, values = node.input[index], constant.values
        weight = placement.constants.get((node_name, 1))
        int32_bias = (index == 2 and constant.low == np.iinfo(np.int32).min and weight is not None
                      and node.input[0] in activations)
        input_quant = activations[node.input[0]] if int32_bias else None  # (its grid: the input's step)
        getter = getters.get(name)
        if getter is not None and getter in reader.all_input_nodes:
            if tuple(module.get_buffer(getter.target).shape) != values.shape:
                continue
            quant = _const_quant(values, input_quant, weight)
            attr = f"dsgonnx_constq_{sum(len(q) for q in owners.values())}"
            module.add_module(attr, quant)
            with module.graph.inserting_before(reader):
                evaluator = module.graph.call_module(attr, (getter,))
            reader.replace_input_with(getter, evaluator)
        elif name in initializers:
            held = _held_tensor(module.get_submodule(target), numpy_helper.to_array(initializers[name]))
            if held is None:
                continue
            owner, attr, transposed = held
            quant = _const_quant(values.T if transposed else values, input_quant, weight)
            parametrize.register_parametrization(owner, attr, quant)
            evaluator = reader
        else:
            continue
        owners.setdefault(evaluator, []).append(quant)
        simulated.add((node_name, index))
    module.graph.lint()
    module.recompile()
    return owners, simulated


@dataclass
class Simulation:
    """The torch simulation of a QDQ model (see the module docstring)."""

    model: TorchModel
    placement: Placement
    quantizers: dict[str, ActQuant]
    unsimulated: list[str] = field(default_factory=list)  # what the QDQ model quantizes that this does not

    def __call__(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        """The first output for ``images``, as float32."""
        return first_output(self.model.module, images, batch, next(self.model.module.parameters()).device)


def unsimulated(placement: Placement, missing: list[str], simulated: set[tuple[str, int]]) -> list[str]:
    """What the QDQ model quantizes that a simulation leaves float: activations its graph lacks
    (``missing``), every quantized constant input (node name, input index) not in ``simulated``
    (a MatMul's weight, a LayerNormalization's scale, an Add's constant, ...), and tensors some
    node reads unquantized."""
    return ([f"activation {name}" for name in missing]
            + [f"input {index} of {node}" for node, index in placement.constants if (node, index) not in simulated]
            + [f"float reader of {name}" for name in placement.float_readers])


def layer_inputs(layers: list) -> set[tuple[str, int]]:
    """The constant inputs training simulates: each layer's weight (a QuantLayer ``module`` of
    node ``onnx_name``) and its bias where the input is quantized."""
    return ({(layer.onnx_name, 1) for layer in layers}
            | {(layer.onnx_name, 2) for layer in layers if layer.module.bias_quantized})


def first_output(module: nn.Module, images: np.ndarray, batch: int, device: torch.device) -> np.ndarray:
    """``module``'s first output for ``images`` in chunks of ``batch``, without grad, as float32."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch], dtype=np.float32))
            out = module(chunk.to(device))
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).float().cpu().numpy())
    return np.concatenate(outputs)


def simulate_qdq(float_path: Path, qdq_path: Path) -> Simulation:
    """The simulation of the QDQ model at ``qdq_path`` built on ``float_path``, the float model
    ORT quantized into it (node names shared): its quantized activations on their grids, the
    dequantized weights and biases of its Conv/Gemm/MatMul layers, and every other quantized constant
    (:func:`insert_constant_quant`)."""
    placement = read_placement(onnx.load(str(qdq_path)))
    torch_model = to_torch(load_model(float_path))
    quantizers, missing = insert_activation_quant(torch_model, placement.activations)
    loaded = set()
    sites = {site.node.name: site for site in quantized_weights(torch_model.graph)}
    for (node_name, index), constant in placement.constants.items():
        site = sites.get(node_name)
        _, _, layer = layer_module(torch_model.module, torch_model.module_names.get(node_name))
        if site is None or layer is None or site.node.op_type not in ("Conv", "Gemm", "MatMul") or index not in (1, 2):
            continue
        values = constant.values.T if index == 1 and site.transposed else constant.values
        parameter = layer.weight if index == 1 else layer.bias
        if parameter is None or tuple(parameter.shape) != values.shape:
            raise UnsupportedModelError(f"simulation: {node_name} input {index} has shape {values.shape}, "
                                        f"the converted layer {None if parameter is None else tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        loaded.add((node_name, index))
    _, constants = insert_constant_quant(torch_model, placement, loaded, quantizers)
    return Simulation(model=torch_model, placement=placement, quantizers=quantizers,
                      unsimulated=unsimulated(placement, missing, loaded | constants))


def fidelity(simulated: np.ndarray, exported: np.ndarray) -> dict:
    """How closely simulated logits follow the exported model's on the same inputs: top-1
    agreement, SQNR in dB (exported as the signal), and the largest difference."""
    from ..validation.metrics import finite_or_none, sqnr_db, top1_agreement

    simulated, exported = simulated.reshape(len(simulated), -1), exported.reshape(len(exported), -1)
    largest = float(np.abs(simulated - exported).max())
    return {"agreement": round(top1_agreement(exported, simulated), 4),
            "sqnr_db": finite_or_none(sqnr_db(exported, simulated), 2),  # None: identical (max_abs_diff 0) or not finite
            "max_abs_diff": finite_or_none(largest)}
