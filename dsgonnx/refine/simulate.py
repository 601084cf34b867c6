"""The torch simulation of a QDQ model: the float model with exactly the exported quantization.

:func:`insert_activation_quant` puts an :class:`~.quantizers.ActQuant` after every tensor the
QDQ model quantizes (:func:`dsgonnx.quant.placement.read_placement`: the model input, layer
inputs and outputs, both inputs of a residual Add, pooled features, ...), on its exported
grid. Reconstruction trains on that graph, so the loss it minimises is the deployed model's.
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
from torch import fx, nn

from ..errors import UnsupportedModelError
from ..graph.onnx_io import load_model
from ..graph.to_torch import TorchModel, to_torch
from ..quant.placement import Grid, Placement, read_placement
from .quantizers import ActQuant

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
    ORT quantized into it (node names shared): its quantized activations on their grids, and
    the dequantized weights and biases of its Conv/Gemm layers."""
    placement = read_placement(onnx.load(str(qdq_path)))
    torch_model = to_torch(load_model(float_path))
    quantizers, missing = insert_activation_quant(torch_model, placement.activations)
    loaded = set()
    nodes = {node.name: node for node in torch_model.graph.graph.node}
    for (node_name, index), constant in placement.constants.items():
        node = nodes.get(node_name)
        _, _, layer = layer_module(torch_model.module, torch_model.module_names.get(node_name))
        if node is None or layer is None or node.op_type not in ("Conv", "Gemm") or index not in (1, 2):
            continue
        values = constant.values
        if node.op_type == "Gemm" and index == 1 and not next((a.i for a in node.attribute if a.name == "transB"), 0):
            values = values.T  # ONNX holds the transpose of nn.Linear's weight
        parameter = layer.weight if index == 1 else layer.bias
        if parameter is None or tuple(parameter.shape) != values.shape:
            raise UnsupportedModelError(f"simulation: {node_name} input {index} has shape {values.shape}, "
                                        f"the converted layer {None if parameter is None else tuple(parameter.shape)}")
        with torch.no_grad():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(values)))
        loaded.add((node_name, index))
    return Simulation(model=torch_model, placement=placement, quantizers=quantizers,
                      unsimulated=unsimulated(placement, missing, loaded))


def fidelity(simulated: np.ndarray, exported: np.ndarray) -> dict:
    """How closely simulated logits follow the exported model's on the same inputs: top-1
    agreement, SQNR in dB (exported as the signal), and the largest difference."""
    from ..validation.metrics import finite_or_none, sqnr_db, top1_agreement

    simulated, exported = simulated.reshape(len(simulated), -1), exported.reshape(len(exported), -1)
    largest = float(np.abs(simulated - exported).max())
    return {"agreement": round(top1_agreement(exported, simulated), 4),
            "sqnr_db": finite_or_none(sqnr_db(exported, simulated), 2),  # None: identical (max_abs_diff 0) or not finite
            "max_abs_diff": finite_or_none(largest)}
