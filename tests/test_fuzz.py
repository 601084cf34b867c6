"""Mutation fuzz of the front end: a few hundred seeded mutants of a tiny BN model — byte-level
(flips, truncations, duplicated or zeroed chunks) and structural (attributes, dropped nodes,
rewired inputs, initializer shapes and types, op types, opsets, input and output sizes) — go
through ``inspect``. Each must load and check, or fail with a dsgonnx error (one line, exit 2
on the CLI); any other exception is a bug. The native aborts the issue found (a dilation that
does not fit its input) are refused before ONNX Runtime sees the model."""

from __future__ import annotations

import random

import onnx

import dsgonnx
from dsgonnx import DsgonnxError
from zoo import export_torchscript

MUTANTS = 300


def _byte_mutant(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.choice(("flip", "truncate", "duplicate", "zero"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        out = out[: rng.randrange(len(out))]
    else:
        start = rng.randrange(len(out))
        end = min(len(out), start + rng.randint(1, 64))
        if kind == "duplicate":
            out[start:start] = out[start:end]
        else:
            out[start:end] = bytes(end - start)
    return bytes(out)


def _structural_mutant(data: bytes, rng: random.Random) -> bytes:
    model = onnx.load_from_string(data)
    graph = model.graph
    node = rng.choice(list(graph.node))
    kind = rng.choice(("attribute", "drop", "rewire", "init_shape", "init_type", "op", "opset", "input", "output"))
    if kind == "attribute" and node.attribute:
        attribute = rng.choice(list(node.attribute))
        if attribute.type == onnx.AttributeProto.INT:
            attribute.i = rng.choice((-5, 0, 1, 7, 1000, 2**40))
        elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
            attribute.ints[rng.randrange(len(attribute.ints))] = rng.choice((-3, 0, 5, 1000))
        elif attribute.type == onnx.AttributeProto.FLOAT:
            attribute.f = rng.choice((-1.0, 0.0, float("nan"), float("inf"), 1e30))
    elif kind == "drop":
        graph.node.remove(node)
    elif kind == "rewire" and node.input:
        other = rng.choice(list(graph.node))
        node.input[rng.randrange(len(node.input))] = other.output[0]
    elif kind == "init_shape" and graph.initializer:
        tensor = rng.choice(list(graph.initializer))
        if tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice((0, 1, 3, 999))
    elif kind == "init_type" and graph.initializer:
        rng.choice(list(graph.initializer)).data_type = rng.choice((2, 6, 7, 10, 11))
    elif kind == "op":
        node.op_type = rng.choice(("Relu", "Conv", "Add", "Gemm", "Reshape", "Softmax", "Frobnicate"))
    elif kind == "opset":
        model.opset_import[0].version = rng.choice((1, 6, 7, 9, 11, 17, 21, 22, 99))
    elif kind == "input":
        dim = graph.input[0].type.tensor_type.shape.dim[rng.randrange(4)]
        dim.ClearField("dim_param")
        dim.dim_value = rng.choice((1, 2, 5, 64, 100000))
    elif kind == "output":
        dim = graph.output[0].type.tensor_type.shape.dim[-1]
        dim.ClearField("dim_param")
        dim.dim_value = rng.choice((1, 2, 1000))
    return model.SerializeToString()


def test_no_mutant_ends_in_anything_but_a_dsgonnx_error(tmp_path):
    data = export_torchscript(tmp_path / "tiny.onnx", keep_bn=True).read_bytes()
    rng = random.Random(20261201)
    outcomes, failures = {"loaded": 0, "refused": 0}, []
    for number in range(MUTANTS):
        mutant = _byte_mutant(data, rng) if number % 2 == 0 else _structural_mutant(data, rng)
        path = tmp_path / f"mutant{number}.onnx"
        path.write_bytes(mutant)
        try:
            dsgonnx.inspect(str(path), parity_samples=2)
            outcomes["loaded"] += 1
        except DsgonnxError as exc:
            assert "\n" not in str(exc).strip(), str(exc)  # one line
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - what the fuzz is for
            failures.append(f"mutant {number}: {type(exc).__name__}: {str(exc)[:200]}")
        path.unlink()
    assert not failures, "\n".join(failures)
    # the mutants exercise both sides: some still load, most are refused
    assert outcomes["loaded"] >= 20 and outcomes["refused"] >= 100, outcomes

