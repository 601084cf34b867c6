"""Cross-layer equalization: the FP32 function is unchanged, ReLU6 keeps its per-channel bound,
and only single-consumer Conv pairs are rescaled."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from zoo import SHARED, make_model

from dsgonnx.quant.equalize import equalize, find_pairs
from dsgonnx.quant.qdq import pre_process

MOBILENET = SHARED / "models" / "imagenet_mobilenet_v1_0.25.onnx"


def _run_all(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _run_all(model, x)[0]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Conv node name -> weight."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def _imbalance(model: onnx.ModelProto, pairs: list[tuple[str, str, int]]) -> float:
    """Mean over pairs of the mean |log(r1_i / r2_i)| over live channels."""
    weights = _weights(model)
    spreads = []
    for conv1, conv2, group in pairs:
        w1, w2 = weights[conv1], weights[conv2]
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(1)
        per_in, per_out = w2.shape[1], w2.shape[0] // group
        r2 = np.array([np.abs(w2[(i // per_in) * per_out:(i // per_in + 1) * per_out, i % per_in]).max()
                       for i in range(len(r1))])
        live = (r1 > 1e-6 * r1.max()) & (r2 > 1e-6 * r2.max())
        spreads.append(np.abs(np.log(r1[live] / r2[live])).mean())
    return float(np.mean(spreads))


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _assert_parity(reference: np.ndarray, got: np.ndarray) -> None:
    assert np.abs(reference - got).max() <= 1e-3 * max(1.0, float(np.abs(reference).max()))
    assert (reference.argmax(1) == got.argmax(1)).all()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> onnx.ModelProto:
    if not MOBILENET.is_file():
        pytest.skip(f"{MOBILENET} not found: the MobileNet test needs ../shared")
    return onnx.load(str(pre_process(MOBILENET, tmp_path_factory.mktemp("cle") / "prep.onnx")))


def test_mobilenet_equalized_keeps_fp32_and_balances_ranges(mobilenet):
    before = mobilenet.SerializeToString()
    pairs = [(p.conv1.name, p.conv2.name, _group(p.conv2)) for p in find_pairs(mobilenet)]
    equalized, report = equalize(mobilenet)

    assert mobilenet.SerializeToString() == before  # the input model is untouched
    assert report["pairs"] == len(pairs) >= 20
    assert 1 <= report["sweeps"] <= 100
    assert report["relu6_bounded"] == sum(1 for p in find_pairs(mobilenet) if p.high is not None)
    assert report["relu6_bounded"] > 0
    assert sum(n.op_type == "Min" for n in equalized.graph.node) == report["relu6_bounded"]
    onnx.checker.check_model(equalized)
    # dead channels (max|w| ~1e-12 after BN folding) keep s = 1; scaling them would push the
    # bounds (and biases) of those channels to ~1e7
    mins = {n.input[1] for n in equalized.graph.node if n.op_type == "Min"}
    bounds = [numpy_helper.to_array(t) for t in equalized.graph.initializer if t.name in mins]
    assert max(float(np.abs(b).max()) for b in bounds) < 1e5

    x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    _assert_parity(_run(mobilenet, x), _run(equalized, x))
    assert _imbalance(equalized, pairs) < 0.5 * _imbalance(mobilenet, pairs)


def _conv_clip_conv_relu_dw() -> onnx.ModelProto:
    """Conv(3->4) -> Clip(0, 6) -> Conv 1x1 (4->6) -> Relu -> depthwise 3x3 Conv (6 groups),
    with channel scales spanning 1e-2..1e2 so the equalization scales are far from 1 and
    channel 0 saturates its ReLU6 heavily."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * np.float32([20, 0.01, 1, 5]).reshape(4, 1, 1, 1)
    b1 = np.float32([1.0, 0.0, 0.5, -0.5])
    w2 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32) * np.float32([0.02, 50, 1, 0.1]).reshape(1, 4, 1, 1)
    b2 = rng.standard_normal(6).astype(np.float32)
    w3 = rng.standard_normal((6, 1, 3, 3)).astype(np.float32) * np.float32([1, 10, 0.1, 1, 3, 0.3]).reshape(6, 1, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu"),
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="dw", group=6, pads=[1, 1, 1, 1]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6, 8, 8])],
        [("w1", w1), ("b1", b1), ("lo", np.float32(0)), ("hi", np.float32(6)),
         ("w2", w2), ("b2", b2), ("w3", w3)],
        ir_version=8,
    )


def test_relu6_becomes_relu_and_per_channel_min():
    model = _conv_clip_conv_relu_dw()
    equalized, report = equalize(model)
    assert report == {"pairs": 2, "sweeps": report["sweeps"], "converged": True, "relu6_bounded": 1}

    x = np.random.default_rng(2).standard_normal((8, 3, 8, 8)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.insert(0, helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    assert (_run(probe, x)[:, 0] > 6).mean() > 0.2  # the ReLU6 really saturates

    (min_node,) = [n for n in equalized.graph.node if n.op_type == "Min"]
    assert min_node.output[0] == "a1"
    assert not any(n.op_type == "Clip" for n in equalized.graph.node)
    bound = numpy_helper.to_array(next(t for t in equalized.graph.initializer if t.name == min_node.input[1]))
    assert bound.shape == (4, 1, 1)
    assert np.ptp(np.log10(bound)) > 1  # per-channel, far from the original 6

    reference, got = _run(model, x), _run(equalized, x)
    assert np.abs(reference).max() > 1
    _assert_parity(reference, got)
    # the ranges of each pair are now equal, channel by channel
    pairs = [("conv1", "conv2", 1), ("conv2", "dw", 6)]
    assert _imbalance(model, pairs) > 1 and _imbalance(equalized, pairs) < 1e-3

    # without the bound the function changes: the Min above is what keeps it exact
    unbounded = onnx.ModelProto()
    unbounded.CopyFrom(equalized)
    (relu,) = [n for n in unbounded.graph.node if n.op_type == "Relu" and n.output[0] == min_node.input[0]]
    relu.output[0] = "a1"
    unbounded.graph.node.remove(next(n for n in unbounded.graph.node if n.op_type == "Min"))
    assert np.abs(_run(unbounded, x) - reference).max() > 1e-2 * np.abs(reference).max()


def test_tensor_with_two_consumers_is_not_equalized():
    """conv1 -> relu feeds both conv2 and side: rescaling conv1 would change side's input.
    conv2 -> relu -> conv3 is a proper pair and is equalized."""
    rng = np.random.default_rng(3)
    scales = np.float32([30, 0.03, 1, 3]).reshape(4, 1, 1, 1)
    arrays = {
        "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * scales,
        "w2": rng.standard_normal((4, 4, 1, 1)).astype(np.float32) * scales,
        "w3": rng.standard_normal((5, 4, 1, 1)).astype(np.float32),
        "ws": rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a1"], name="relu1"),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["a1", "ws"], ["side"], name="side"),
        helper.make_node("Relu", ["c2"], ["a2"], name="relu2"),
        helper.make_node("Conv", ["a2", "w3"], ["y"], name="conv3"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5, 8, 8]),
         helper.make_tensor_value_info("side", TensorProto.FLOAT, [None, 2, 8, 8])],
        list(arrays.items()),
        ir_version=8,
    )
    equalized, report = equalize(model)
    assert report["pairs"] == 1 and report["relu6_bounded"] == 0
    before, after = _weights(model), _weights(equalized)
    np.testing.assert_array_equal(after["conv1"], before["conv1"])
    np.testing.assert_array_equal(after["side"], before["side"])
    assert not np.allclose(after["conv2"], before["conv2"])  # the conv2 -> conv3 pair was rescaled

    x = np.random.default_rng(4).standard_normal((4, 3, 8, 8)).astype(np.float32)
    for reference, got in zip(_run_all(model, x), _run_all(equalized, x)):
        _assert_parity(reference.reshape(len(x), -1), got.reshape(len(x), -1))
