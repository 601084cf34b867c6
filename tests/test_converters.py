"""One ONNX Runtime parity test per converter family dsgonnx adds to onnx2torch.

Each case is a small graph at the op version onnx2torch lacks; the torch module built by
onnx2torch + dsgonnx's converters must reproduce ORT's outputs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from dsgonnx.graph.to_torch import build_module as convert

from dsgonnx.graph.converters import register_all
from zoo import make_model

F = TensorProto.FLOAT
I64 = TensorProto.INT64
RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _vi(name, elem=F, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def _ort_vs_torch(model, feeds: dict[str, np.ndarray], atol=1e-5):
    register_all()
    ir = 10 if max(o.version for o in model.opset_import) <= 23 else 11
    model.ir_version = min(model.ir_version, ir) if model.ir_version else ir
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    module = convert(model).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(v) for v in feeds.values()])
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        have = have.numpy()
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, atol=atol, rtol=1e-5)


def _unary(op, opset, x, **attrs):
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    return make_model([node], [_vi("x", F, list(x.shape))], [_vi("y")], opset=opset), {"x": x}


# --- passthrough: newer versions that only widened their types ------------------------
TYPE_ONLY_CASES = [
    ("Identity", 19, {}), ("Identity", 21, {}), ("Identity", 25, {}),
    ("Flatten", 21, {"axis": 1}), ("Flatten", 25, {"axis": 2}),
    ("Transpose", 21, {"perm": [0, 2, 3, 1]}), ("Transpose", 24, {"perm": [3, 2, 1, 0]}),
    ("GlobalAveragePool", 22, {}),
    ("MaxPool", 22, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", 19, {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", 22, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("HardSwish", 22, {}), ("HardSigmoid", 22, {"alpha": 0.2}), ("Elu", 22, {}), ("Selu", 22, {}),
    ("Softplus", 22, {}), ("Round", 22, {}), ("Sin", 22, {}), ("Dropout", 22, {}),
    ("InstanceNormalization", 22, None),
]


@pytest.mark.parametrize("op,opset,attrs", TYPE_ONLY_CASES, ids=lambda v: str(v))
def test_type_only_versions(op, opset, attrs):
    x = _x(2, 3, 6, 6)
    if op == "InstanceNormalization":
        node = helper.make_node(op, ["x", "s", "b"], ["y"])
        model = make_model([node], [_vi("x", F, [2, 3, 6, 6])], [_vi("y")], opset=opset,
                           initializers=[("s", _x(3)), ("b", _x(3))])
        feeds = {"x": x}
    else:
        model, feeds = _unary(op, opset, x, **attrs)
    _ort_vs_torch(model, feeds)


@pytest.mark.parametrize("opset", [22])
def test_conv22_and_conv_transpose22(opset):
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["y"], strides=[2, 2]),
    ]
    model = make_model(nodes, [_vi("x", F, [1, 3, 8, 8])], [_vi("y")], opset=opset,
                       initializers=[("w", _x(4, 3, 3, 3)), ("b", _x(4)), ("wt", _x(4, 2, 2, 2))])
    _ort_vs_torch(model, {"x": _x(1, 3, 8, 8)})


@pytest.mark.parametrize("opset", [19, 21, 23, 25])
def test_shape_plumbing_versions(opset):
    """Shape/Constant/ConstantOfShape/Unsqueeze/Squeeze/Cast/Equal as dynamo graphs use them."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=1, end=2),
        helper.make_node("Constant", [], ["one"], value=helper.make_tensor("one", I64, [1], [1])),
        helper.make_node("Unsqueeze", ["x", "one"], ["u"]),
        helper.make_node("Squeeze", ["u", "one"], ["q"]),
        helper.make_node("ConstantOfShape", ["s"], ["z"], value=helper.make_tensor("v", F, [1], [0.5])),
        helper.make_node("Cast", ["z"], ["zc"], to=F),
        helper.make_node("Equal", ["s", "s"], ["eq"]),
        helper.make_node("Cast", ["eq"], ["eqf"], to=F),
        helper.make_node("Add", ["zc", "eqf"], ["k"]),
        helper.make_node("Mul", ["q", "k"], ["y"]),
    ]
    model = make_model(nodes, [_vi("x", F, [2, 3])], [_vi("y")], opset=opset)
    _ort_vs_torch(model, {"x": _x(2, 3)})


@pytest.mark.parametrize("opset", [15, 19, 21])
def test_cast_like(opset):
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.DOUBLE, [1], [2.5])),
             helper.make_node("CastLike", ["c", "x"], ["cl"]),
             helper.make_node("Mul", ["x", "cl"], ["y"])]
    model = make_model(nodes, [_vi("x", F, [2, 3])], [_vi("y")], opset=opset)
    _ort_vs_torch(model, {"x": _x(2, 3)})


# --- Reduce*-18: axes as an input ------------------------------------------------------
REDUCTIONS = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSumExp", "ReduceSumSquare", "ReduceLogSum"]


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes_kind", ["initializer", "runtime", "absent"])
def test_reduce_18(op, keepdims, axes_kind):
    x = np.abs(_x(2, 3, 4, 5)) + 0.1 if op == "ReduceLogSum" else _x(2, 3, 4, 5)
    inputs = [_vi("x", F, [2, 3, 4, 5])]
    feeds = {"x": x}
    initializers = []
    if axes_kind == "absent":
        node = helper.make_node(op, ["x"], ["y"], keepdims=keepdims)
    else:
        node = helper.make_node(op, ["x", "axes"], ["y"], keepdims=keepdims)
        axes = np.array([2, -1], dtype=np.int64)
        if axes_kind == "initializer":
            initializers = [("axes", axes)]
        else:
            inputs.append(_vi("axes", I64, [2]))
            feeds["axes"] = axes
    model = make_model([node], inputs, [_vi("y")], opset=18, initializers=initializers)
    _ort_vs_torch(model, feeds, atol=1e-4)


def test_reduce_noop_with_empty_axes_and_opset_20():
    node = helper.make_node("ReduceMax", ["x"], ["y"], keepdims=1, noop_with_empty_axes=1)
    model = make_model([node], [_vi("x", F, [2, 3])], [_vi("y")], opset=20)
    _ort_vs_torch(model, {"x": _x(2, 3)})


# --- Pad-18+: axes input, wrap mode ----------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("with_axes", [False, True])
def test_pad(mode, with_axes):
    x = _x(1, 2, 5, 6)
    initializers = [("v", np.array(0.7, dtype=np.float32))]
    if with_axes:
        initializers += [("pads", np.array([1, 2, 2, 1], dtype=np.int64)), ("axes", np.array([-2, 3], dtype=np.int64))]
        node = helper.make_node("Pad", ["x", "pads", "v", "axes"], ["y"], mode=mode)
    else:
        initializers += [("pads", np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64))]
        node = helper.make_node("Pad", ["x", "pads", "v"], ["y"], mode=mode)
    model = make_model([node], [_vi("x", F, [1, 2, 5, 6])], [_vi("y")], opset=19, initializers=initializers)
    _ort_vs_torch(model, {"x": x})


def test_pad_with_runtime_pads_opset_21():
    node = helper.make_node("Pad", ["x", "pads"], ["y"])
    model = make_model([node], [_vi("x", F, [1, 2, 3, 3]), _vi("pads", I64, [8])], [_vi("y")], opset=21)
    _ort_vs_torch(model, {"x": _x(1, 2, 3, 3), "pads": np.array([0, 1, 0, 1, 0, 2, 1, 0], dtype=np.int64)})


# --- Split-18: num_outputs -------------------------------------------------------------
@pytest.mark.parametrize("length,parts", [(6, 3), (7, 3), (5, 2)])
def test_split_18_num_outputs(length, parts):
    outs = [f"y{i}" for i in range(parts)]
    node = helper.make_node("Split", ["x"], outs, axis=1, num_outputs=parts)
    model = make_model([node], [_vi("x", F, [2, length])], [_vi(o) for o in outs], opset=18)
    _ort_vs_torch(model, {"x": _x(2, length)})


def test_split_18_sizes_input():
    node = helper.make_node("Split", ["x", "s"], ["a", "b"], axis=0)
    model = make_model([node], [_vi("x", F, [5, 2])], [_vi("a"), _vi("b")], opset=18,
                       initializers=[("s", np.array([2, 3], dtype=np.int64))])
    _ort_vs_torch(model, {"x": _x(5, 2)})


# --- Resize-18/19 with default new attributes -------------------------------------------
@pytest.mark.parametrize("opset", [18, 19])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize(opset, mode):
    attrs = {"mode": mode}
    if mode == "nearest":
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    model = make_model([node], [_vi("x", F, [1, 2, 4, 4])], [_vi("y")], opset=opset,
                       initializers=[("scales", np.array([1, 1, 2, 2], dtype=np.float32))])
    _ort_vs_torch(model, {"x": _x(1, 2, 4, 4)})


def test_resize_antialias_is_refused_by_name():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1)
    model = make_model([node], [_vi("x", F, [1, 2, 4, 4])], [_vi("y")], opset=18,
                       initializers=[("scales", np.array([1, 1, 0.5, 0.5], dtype=np.float32))])
    register_all()
    with pytest.raises(NotImplementedError, match="antialias"):
        convert(model)


# --- Reshape allowzero -----------------------------------------------------------------
@pytest.mark.parametrize("opset", [14, 19, 21, 25])
@pytest.mark.parametrize("allowzero", [0, 1])
def test_reshape(opset, allowzero):
    shape = np.array([0, -1] if allowzero == 0 else [2, -1], dtype=np.int64)
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=allowzero)
    model = make_model([node], [_vi("x", F, [2, 3, 4])], [_vi("y")], opset=opset, initializers=[("shape", shape)])
    _ort_vs_torch(model, {"x": _x(2, 3, 4)})


def test_reshape_allowzero_keeps_a_literal_zero():
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)
    model = make_model([node], [_vi("x", F, [0, 3])], [_vi("y")], opset=19,
                       initializers=[("shape", np.array([3, 0], dtype=np.int64))])
    _ort_vs_torch(model, {"x": np.zeros((0, 3), dtype=np.float32)})


# --- opset 6/7 versions from old vendor graphs -------------------------------------------
def test_legacy_opset7_chain():
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], epsilon=1e-3),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("AveragePool", ["p"], ["a"], kernel_shape=[2, 2]),
        helper.make_node("Dropout", ["a"], ["d", "mask"], ratio=0.5),
        helper.make_node("Slice", ["d"], ["sl"], starts=[0], ends=[3], axes=[1]),
        helper.make_node("Flatten", ["sl"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], transB=1),
        helper.make_node("Sum", ["g", "g"], ["y"]),
    ]
    initializers = [("w", _x(4, 3, 3, 3)), ("b", _x(4)), ("s", _x(4)), ("bb", _x(4)), ("m", _x(4)),
                    ("v", np.abs(_x(4)) + 0.5), ("gw", _x(5, 27)), ("gb", _x(5))]
    model = make_model(nodes, [_vi("x", F, [1, 3, 8, 8])], [_vi("y")], opset=7, ir_version=3,
                       initializers=initializers)
    _ort_vs_torch(model, {"x": _x(1, 3, 8, 8)})


def test_node_names_onnx2torch_would_number_alike(tmp_path):
    """ORT's optimiser names a node ``Gather`` beside an exporter's ``/Gather`` and
    ``/Gather_1``; onnx2torch numbers the repeat ``Gather_1`` too and lost a node (a ViT's
    refinement failed: "value ... is used before it is computed"). Every node keeps its own
    module, found by its ONNX name."""
    from onnx import save

    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.graph.to_torch import to_torch

    nodes = [helper.make_node("Neg", ["x"], ["a"], name="Relu"),
             helper.make_node("Relu", ["a"], ["b"], name="/Relu"),
             helper.make_node("Abs", ["b"], ["c"], name="/Relu_1"),
             helper.make_node("Sigmoid", ["c"], ["s"], name="Relu_1"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flatten")]
    model = make_model(nodes, [_vi("x", F, [1, 3, 4, 4])], [_vi("y", F, [1, 3])])
    _ort_vs_torch(model, {"x": _x(1, 3, 4, 4)})
    save(model, tmp_path / "m.onnx")
    twin = to_torch(load_model(str(tmp_path / "m.onnx")))
    assert len(set(twin.module_names.values())) == 6
    kinds = {name: type(twin.submodule(name)).__name__ for name in ("Relu", "/Relu", "/Relu_1", "Relu_1")}
    assert kinds["/Relu"] == "ReLU" and kinds["Relu_1"] == "Sigmoid" and "Neg" in kinds["Relu"], kinds
    assert len(set(kinds.values())) == 4, kinds


@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_gelu_20(approximate):
    """The dynamo exporter writes nn.GELU as Gelu-20 (a ConvNeXt or ViT at opset 20 stopped at
    'unsupported operator Gelu-20')."""
    attrs = {} if approximate is None else {"approximate": approximate}
    x = _x(2, 3, 4, 4) * 3
    _ort_vs_torch(*_unary("Gelu", 20, x, **attrs))


def test_mish_18():
    """nn.Mish from the dynamo exporter at opset 18 and later."""
    _ort_vs_torch(*_unary("Mish", 18, _x(2, 3, 4, 4) * 3))


def test_gelu_with_an_undefined_approximation_is_refused_by_name():
    from dsgonnx.graph.to_torch import _conversion_error

    model, _ = _unary("Gelu", 20, _x(1, 3, 4, 4), approximate="erf")
    register_all()
    message = str(_conversion_error(model, RuntimeError("x")))
    assert "Gelu" in message and "approximate='erf'" in message, message


@pytest.mark.parametrize("opset", [9, 13])
def test_matmul_by_a_constant_matrix_is_a_linear_layer(opset):
    """x·B with B a 2-D initializer (an nn.Linear on a transformer's tokens, exported as MatMul)
    becomes an nn.Linear of Bᵀ — a layer reconstruction and QAT can refine — on inputs of any
    rank; a MatMul of two computed tensors, or by a batched constant, stays onnx2torch's."""
    weight, batched = _x(8, 5), _x(2, 8, 5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["x", "b"], ["z"]),
             helper.make_node("MatMul", ["x", "xt"], ["t"]), helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1])]
    model = make_model([nodes[0], nodes[1], nodes[3], nodes[2]], [_vi("x", F, [2, 3, 8])], [_vi("y"), _vi("z"), _vi("t")],
                       initializers=[("w", weight), ("b", batched)], opset=opset)
    _ort_vs_torch(model, {"x": _x(2, 3, 8)})
    module = convert(model)
    kinds = [type(module.get_submodule(n.target)) for n in module.graph.nodes if n.op == "call_module"]
    assert kinds.count(torch.nn.Linear) == 1
    linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    assert linear.bias is None and torch.equal(linear.weight, torch.from_numpy(weight.T))
