"""Reconstruction units from the structure of a converted torch graph.

A unit is a contiguous run of the fx graph's nodes in topological order. Its inputs are
the values it reads from before the run, its outputs the values read after it (or by the
graph output), so a unit may have several of each (a residual block reads its input once
more at the Add; a cut inside a branch carries the skip tensor past it).

- ``adaround``: each quantized layer is its own unit (layer-wise reconstruction).
- ``brecq``: a block ends at every residual join — an ``Add``/``Sum`` of two computed
  tensors — and, on chains without joins (MobileNet v1), after ``block_layers`` quantized
  layers. ONNX-converted graphs have no class names to go by; the graph is what we have.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import reduce

import torch
from torch import fx

JOIN_OPS = frozenset({"Add", "Sum"})


@dataclass
class Unit:
    nodes: list[fx.Node]
    layers: list[fx.Node]  # the quantized layers inside, in order
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    whole: set[fx.Node] = field(default_factory=set)  # outputs that do not carry the batch (mark_whole)


class Whole:
    """A value that does not carry the batch (a shape tensor read by a later unit): :func:`take`
    gives it whole, :func:`concat` of chunks keeps one."""

    def __init__(self, value):
        self.value = value


def mark_whole(module: fx.GraphModule, units: list["Unit"], chw: tuple, device: torch.device) -> None:
    """Set each unit's ``whole``: the outputs whose leading dimension is not the batch's, found
    by running batches of 1 and 2 zero samples through the units (a shape tensor computed in one
    block and read in a later one; taken by rows, it was indexed out of bounds)."""
    seen: dict[fx.Node, bool] = {}
    placeholder = next(n for n in module.graph.nodes if n.op == "placeholder")
    with torch.no_grad():
        for batch in (1, 2):
            env = {placeholder: torch.zeros((batch, *chw), device=device)}
            for unit in units:
                outputs = run_unit(module, unit, [env[n] for n in unit.inputs])
                for node, value in zip(unit.outputs, outputs):
                    parts = tensors(value)
                    batched = bool(parts) and all(t.dim() > 0 and t.shape[0] == batch for t in parts)
                    seen[node] = seen.get(node, True) and batched
                env.update(zip(unit.outputs, outputs))
    for unit in units:
        unit.whole = {node for node in unit.outputs if not seen.get(node, True)}


def constant_nodes(module: fx.GraphModule) -> set[fx.Node]:
    """fx nodes computed from constants alone (initializers, and what is computed from them
    only: the simulation's dequantized constants, shape arithmetic on them)."""
    constant: set[fx.Node] = set()
    for node in module.graph.nodes:
        if node.op == "get_attr" or (node.op in ("call_module", "call_function", "call_method")
                                     and all(a in constant for a in node.all_input_nodes)):
            constant.add(node)
    return constant


def join_nodes(module: fx.GraphModule, op_types: dict[str, str]) -> set[fx.Node]:
    """fx nodes whose ONNX op is an Add/Sum of two or more computed tensors (a bias Add, whose
    constant the simulation dequantizes, is not a join)."""
    joins = set()
    constant = constant_nodes(module)
    for node in module.graph.nodes:
        if node.op != "call_module" or op_types.get(str(node.target)) not in JOIN_OPS:
            continue
        computed = [a for a in node.all_input_nodes if a not in constant]
        if len(computed) >= 2:
            joins.add(node)
    return joins


def partition(module: fx.GraphModule, layers: set[fx.Node], joins: set[fx.Node], method: str,
              block_layers: int = 4) -> list[Unit]:
    nodes = [n for n in module.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    units: list[Unit] = []
    current: list[fx.Node] = []

    def close():
        if current:
            units.append(Unit(nodes=list(current), layers=[n for n in current if n in layers]))
            current.clear()

    for node in nodes:
        if method == "adaround" and node in layers:
            close()
            current.append(node)
            close()
            continue
        current.append(node)
        if method == "brecq" and (node in joins or sum(n in layers for n in current) >= block_layers):
            close()
    close()
    for unit in units:
        inside = set(unit.nodes)
        unit.inputs = read_from_outside(unit.nodes)
        unit.outputs = [n for n in unit.nodes if any(user not in inside for user in n.users)]
    return units


def read_from_outside(nodes: list[fx.Node]) -> list[fx.Node]:
    """The computed values ``nodes`` read that none of them computes, in order of first use."""
    inside, seen = set(nodes), []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr" and arg not in seen:
                seen.append(arg)
    return seen


def fetch_attr(module: fx.GraphModule, target: str):
    return reduce(getattr, target.split("."), module)


def run_unit(module: fx.GraphModule, unit: Unit, inputs: list) -> list:
    """Execute the unit's nodes on ``inputs`` (values of ``unit.inputs``); returns the
    values of ``unit.outputs``."""
    env = dict(zip(unit.inputs, inputs))

    def value(node: fx.Node):
        if node.op == "get_attr":
            return fetch_attr(module, node.target)
        return env[node]

    for node in unit.nodes:
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            env[node] = module.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # pragma: no cover - partition() never includes other kinds
            raise RuntimeError(f"unexpected fx node {node.op}")
    return [env[node] for node in unit.outputs]


def take(value, index):
    """Rows ``index`` of a tensor, or of every tensor in a tuple/list (a :class:`Whole` value whole)."""
    if isinstance(value, Whole):
        return value.value
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() else value
    if isinstance(value, (tuple, list)):
        return type(value)(take(v, index) for v in value)
    return value


def concat(parts: list):
    first = parts[0]
    if isinstance(first, Whole):  # the same in every chunk
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() else first
    if isinstance(first, (tuple, list)):
        return type(first)(concat([p[i] for p in parts]) for i in range(len(first)))
    return first


def tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return reduce(operator.add, (tensors(v) for v in value), [])
    return []
