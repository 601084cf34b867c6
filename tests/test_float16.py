"""The float16 interface a float32 twin's quantized model gets back (dsgonnx.graph.normalize),
and the twin itself (dsgonnx.graph.onnx_io.quantizable); the whole path on the shared float16,
opset-7 SqueezeNet is in test_real_models.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from dsgonnx.graph.normalize import file_interface, float32_interface


def _model() -> onnx.ModelProto:
    """x -> Relu -> y (an output the file gives in float16), x -> Neg -> z (one it gives in float32),
    y is also read inside the graph (Sigmoid -> s, float16 in the file)."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu"),
                               helper.make_node("Neg", ["x"], ["z"], name="neg"),
                               helper.make_node("Sigmoid", ["y"], ["s"], name="sigmoid")],
                              "g", [value("x")], [value("y"), value("z"), value("s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)


def _run(model: onnx.ModelProto, x: np.ndarray) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))


def test_the_float16_interface_casts_at_the_edges_and_comes_off_again():
    model = _model()
    file_interface(model, "x", ["y", "s"])
    onnx.checker.check_model(model, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert types == {"x": TensorProto.FLOAT16, "y": TensorProto.FLOAT16, "z": TensorProto.FLOAT, "s": TensorProto.FLOAT16}
    x = np.array([[-1.5, 0.0, 0.25, 3.0]], np.float16)
    out = _run(model, x)
    assert out["y"].dtype == np.float16 and out["z"].dtype == np.float32 and out["s"].dtype == np.float16
    np.testing.assert_array_equal(out["y"], np.maximum(x, 0))
    np.testing.assert_array_equal(out["z"], -x.astype(np.float32))
    np.testing.assert_allclose(out["s"], 1 / (1 + np.exp(-np.maximum(x, 0).astype(np.float32))), rtol=1e-3)
    float32_interface(model, "x")
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Neg", "Sigmoid"]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in (*model.graph.input, *model.graph.output))
    again = _run(model, x.astype(np.float32))
    np.testing.assert_array_equal(again["y"], np.maximum(x.astype(np.float32), 0))
