"""dsgonnx quantize on a tiny BN model: every bit width, INT4 types, exact simulated grids,
real and synthetic calibration, and bad input that writes nothing."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from dsgonnx.artifacts import SyntheticSet
from dsgonnx.hardware import needs_reduce_range
from dsgonnx.pipeline import FALLBACK_SAMPLES, quantize
from dsgonnx.preprocess import PRESETS
from dsgonnx.quant import QuantConfig
from dsgonnx_cli.main import cli
from zoo import export_torchscript, reference_logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    kept = export_torchscript(folder / "tiny.onnx", keep_bn=True)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((24, 3, 16, 16)).astype(np.float32)
    np.savez(folder / "calib.npz", images=calib)
    val = rng.standard_normal((40, 3, 16, 16)).astype(np.float32)
    labels = reference_logits(val).argmax(1)
    np.savez(folder / "val.npz", images=val, labels=labels)
    return {"folder": folder, "model": kept, "calib": folder / "calib.npz", "val": folder / "val.npz", "images": val}


def _quantize(setup, name, **settings):
    settings.setdefault("calib", str(setup["calib"]))
    settings.setdefault("validate", False)
    settings.setdefault("num_samples", 24)
    out = setup["folder"] / name
    return quantize(str(setup["model"]), QuantConfig(output=str(out), force=True, **settings)), out


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def _weight_dq(model):
    inits = {t.name: t for t in model.graph.initializer}
    return [(n, numpy_helper.to_array(inits[n.input[0]])) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4]


@pytest.mark.parametrize("wbits,abits", [(8, 8), (6, 6), (4, 4), (16, 16), (2, 2), (3, 3), (5, 5), (7, 7), (4, 8),
                                         (8, 4), (6, 4), (16, 4)])
def test_every_bit_width_gives_a_valid_model_that_runs(setup, wbits, abits):
    result, out = _quantize(setup, f"w{wbits}a{abits}.onnx", wbits=wbits, abits=abits)
    onnx.checker.check_model(str(out))
    logits = _run(out, setup["images"])
    assert logits.shape == (40, 10) and np.isfinite(logits).all()
    # 4-bit activations beside wider weights: simulated in uint8 (ORT's QLinearConv takes no UINT4)
    assert result.bits["simulated"] == (wbits not in (4, 8, 16) or abits not in (4, 8, 16) or (abits == 4 != wbits))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["dsgonnx.bits"])["weights"] == wbits
    assert props["dsgonnx.simulated"] == str(result.bits["simulated"]).lower()
    if wbits >= 6 and abits >= 6:  # fine grids follow the float model closely (5 bits: 38 dB)
        reference = reference_logits(setup["images"])
        sqnr = 10 * np.log10(np.sum(reference**2) / np.sum((logits - reference) ** 2))
        assert sqnr >= 40


def test_w4a4_uses_int4_types_at_opset_21(setup):
    _, out = _quantize(setup, "int4.onnx", wbits=4, abits=4, first_layer_8bit=False)
    model = onnx.load(str(out))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    inits = {t.name: t for t in model.graph.initializer}
    weight_types = {inits[n.input[0]].data_type for n, _ in _weight_dq(model)}
    assert weight_types == {onnx.TensorProto.INT4}
    zero_points = [inits[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert zero_points and set(zero_points) == {onnx.TensorProto.UINT4}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node if "Quantize" in n.op_type)


def test_4_bit_activations_beside_8_bit_weights_are_simulated_in_uint8(setup):
    _, out = _quantize(setup, "w8a4.onnx", wbits=8, abits=4, first_layer_8bit=False)
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    zero_points = {inits[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert zero_points == {onnx.TensorProto.UINT8}
    highs = {int(numpy_helper.to_array(inits[n.input[2]])) for n in model.graph.node if n.op_type == "Clip"}
    assert highs == {15}  # the 4-bit grid's integers, 0..15
    assert all(np.abs(w).max() > 31 for _, w in _weight_dq(model))  # weights on the 8-bit grid


def test_bit_width_zero_is_refused_not_taken_for_8(setup):
    for flag in ("--wbits", "--abits"):
        out = setup["folder"] / f"zero{flag}.onnx"
        result = CliRunner().invoke(cli, ["quantize", str(setup["model"]), flag, "0", "--calib", str(setup["calib"]),
                                          "--num-samples", "24", "--no-validate", "-o", str(out)])
        assert result.exit_code == 2 and "bit width 0" in result.stderr and not out.exists(), result.stderr


def test_simulated_6_bit_grids_are_exact(setup, tmp_path):
    _, out = _quantize(setup, "w6a6.onnx", wbits=6, abits=6, first_layer_8bit=False)
    model = onnx.load(str(out))
    for _, weight in _weight_dq(model):
        assert weight.dtype == np.int8 and weight.min() >= -31 and weight.max() <= 31  # the grid: the grids test
    # every activation's integers pass a Clip to [0, 63]; expose them and check on data
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips
    for clip in clips:
        model.graph.output.append(helper.make_tensor_value_info(clip.output[0], onnx.TensorProto.UINT8, None))
    path = tmp_path / "exposed.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # inputs far outside the calibration range must saturate at the 6-bit ends, not at 255
    values = session.run(None, {"input": setup["images"] * 8})[1:]
    assert max(int(v.max()) for v in values) == 63 and min(int(v.min()) for v in values) == 0


def _clipped(model) -> set[str]:
    """The activations whose integers pass the simulated-bit Clip."""
    producers = {out: n for n in model.graph.node for out in n.output}
    return {producers[n.input[0]].input[0] for n in model.graph.node if n.op_type == "Clip"}


def test_first_layer_stays_8_bit_below_8_bits(setup):
    result, out = _quantize(setup, "w6a6-first8.onnx", wbits=6, abits=6)
    model = onnx.load(str(out))
    first = result.decisions["first_layer_8bit"]
    # the input, the first Conv's weights, its output and the ReLU after it
    assert set(first["tensors"]) == {"input", "ConvBnFusion_W_conv1.weight", "/bn1/BatchNormalization_output_0",
                                     "/Relu_output_0"}
    assert 0 < first["weight_share"] < 1
    weights = {n.input[0]: w for n, w in _weight_dq(model)}
    first_weight = next(w for name, w in weights.items() if "conv1" in name)
    # the 8-bit grid, its scale fitted to the weight: ORT's reduced one, ±64, on a CPU without VNNI
    assert np.abs(first_weight).max() == (64 if result.bits["reduce_range"] else 127)
    assert result.bits["reduce_range"] is needs_reduce_range()
    assert all(np.abs(w).max() <= 31 for name, w in weights.items() if "conv1" not in name)
    clipped = _clipped(model)
    assert "input" not in clipped and "/Relu_output_0" not in clipped  # 8-bit: no simulated-bit Clip
    assert "/Relu_1_output_0" in clipped  # the next layer's output is 6-bit
    uniform, out6 = _quantize(setup, "w6a6-uniform.onnx", wbits=6, abits=6, first_layer_8bit=False)
    assert "first_layer_8bit" not in uniform.decisions and "input" in _clipped(onnx.load(str(out6)))
    eight, _ = _quantize(setup, "w8a8-first.onnx")
    assert "first_layer_8bit" not in eight.decisions  # nothing to keep at 8 bits
    # 16-bit weights with 4-bit activations keep an 8-bit first layer too, on the same grid
    wide, out16 = _quantize(setup, "w16a4-first8.onnx", wbits=16, abits=4)
    assert wide.bits["reduce_range"] is needs_reduce_range()
    first16 = next(w for n, w in _weight_dq(onnx.load(str(out16))) if "conv1" in n.input[0])
    assert first16.dtype == np.int8 and np.abs(first16).max() == (64 if needs_reduce_range() else 127)


def test_int4_models_keep_the_first_layer_in_8_bit_types(setup):
    result, out = _quantize(setup, "int4-first8.onnx", wbits=4, abits=4)
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    types = {n.input[0]: inits[n.input[0]].data_type for n, _ in _weight_dq(model)}
    assert {t for name, t in types.items() if "conv1" in name} == {onnx.TensorProto.INT8}
    assert {t for name, t in types.items() if "conv1" not in name} == {onnx.TensorProto.INT4}
    zero_points = {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    assert zero_points.pop("input") == zero_points.pop("/Relu_output_0") == onnx.TensorProto.UINT8
    assert set(zero_points.values()) == {onnx.TensorProto.UINT4}
    assert {"input", "ConvBnFusion_W_conv1.weight", "/Relu_output_0"} <= set(result.decisions["first_layer_8bit"]["tensors"])
    assert np.isfinite(_run(out, setup["images"])).all()
    # per channel like every other weight (an override without an axis made ORT quantize it per tensor)
    for node, weight in _weight_dq(model):
        assert numpy_helper.to_array(inits[node.input[1]]).shape == (weight.shape[0],), node.input[0]


@pytest.mark.parametrize("wbits,narrow", [(4, (-8, 7)), (6, (-31, 31))])
def test_reduce_range_narrows_only_the_8_bit_weights(setup, wbits, narrow):
    """On a CPU without VNNI ORT's u8·s8 kernels saturate at ±127: the 8-bit first layer of a
    low-bit model takes ORT's reduced grid, ±64, and the B-bit weights keep their whole grid
    (ORT's own reduce_range would narrow native INT4 to [-4, 3])."""
    result, out = _quantize(setup, f"reduced-w{wbits}.onnx", wbits=wbits, abits=wbits, reduce_range=True)
    assert result.bits["reduce_range"] is True
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    for node, weight in _weight_dq(model):
        scales = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        low, high = (-64, 64) if "conv1" in node.input[0] else narrow
        assert low <= weight.min() and weight.max() <= high, node.input[0]
        # each channel's scale fits its largest weight to the grid's end (a narrower grid would leave the end unused)
        ends = np.abs(weight.astype(np.int64)).reshape(len(weight), -1).max(axis=1)
        assert ends.max() == max(-low, high), node.input[0]
        assert scales.shape == (len(weight),)
    plain, _ = _quantize(setup, f"full-w{wbits}.onnx", wbits=wbits, abits=wbits, reduce_range=False)
    assert plain.bits["reduce_range"] is False


def test_a_kept_8_bit_grid_is_not_clipped_where_ort_shares_it(tmp_path):
    """ORT gives a Pad (MaxPool, Reshape, ...) its input's quantization grid; when that input
    stays at 8 bits, the padded integers must not be clipped to the 6-bit range (they were:
    MobileNet v1 0.25 W6A6 fell to 9.6% with its input at 8 bits)."""
    from dsgonnx.quant.bits import resolve_bits
    from dsgonnx.quant.calibrate import compute_ranges
    from dsgonnx.quant.qdq import pre_process, quantize_qdq
    from dsgonnx.quant.reader import ArrayReader

    conv_w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["input", "pads"], ["padded"], name="pad", mode="reflect"),  # not fused into the Conv
         helper.make_node("Conv", ["padded", "w"], ["y"], name="conv")],
        "padded", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [4, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4, 8, 8])],
        [conv_w, numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(tmp_path / "pad.onnx"))
    prepared = pre_process(tmp_path / "pad.onnx", tmp_path / "prepared.onnx")
    images = np.random.default_rng(1).uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    weights, activations = resolve_bits(6, 6, "cpu")
    ranges = compute_ranges(prepared, ArrayReader("input", images, 4), "minmax", activations)
    quantize_qdq(prepared, tmp_path / "q.onnx", ranges, weights, activations, per_channel=True,
                 reduce_range=needs_reduce_range(), logits="quantize", keep_8bit={"input", "w"})
    q = onnx.load(str(tmp_path / "q.onnx"))
    scales = {n.input[0]: n.input[1] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["padded"] == scales["input"]  # ORT shares the grid (else this test proves nothing)
    assert not {"input", "padded"} & _clipped(q) and len(_clipped(q)) == 1  # the Conv output (6-bit)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    float_session = ort.InferenceSession(str(prepared), providers=["CPUExecutionProvider"])
    got, want = session.run(None, {"input": images})[0], float_session.run(None, {"input": images})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_pooled_features_take_their_input_range(setup):
    def grids(out):  # quantized activation -> (scale, zero point)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        return {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]])) for n in onnx.load(str(out)).graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] not in inits}

    # logits "float": the classifier's input (the reshaped mean) is quantized
    result, out = _quantize(setup, "pool-input.onnx", calib="gaussian", num_samples=4, iters=0, logits="float")
    assert result.decisions["pool_range"] == {"policy": "input",
                                              "tensors": ["/ReduceMean_output_0", "/Reshape_output_0"]}
    shared = grids(out)
    assert shared["/Reshape_output_0"] == shared["/Relu_1_output_0"]
    calibrated, out2 = _quantize(setup, "pool-calibrated.onnx", calib="gaussian", num_samples=4, iters=0,
                                 logits="float", pool_range="calibrated")
    own = grids(out2)
    assert own["/Reshape_output_0"][0] < 0.5 * own["/Relu_1_output_0"][0]  # a mean's own range is narrower
    assert calibrated.decisions["pool_range"] == {"policy": "calibrated", "tensors": []}


def test_gpu_target_is_symmetric_int8(setup):
    result, out = _quantize(setup, "gpu.onnx", target="gpu")
    model = onnx.load(str(out))
    inits = {t.name: t for t in model.graph.initializer}
    activation_zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                              if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert all(z.dtype == np.int8 and not z.any() for z in activation_zero_points)
    assert result.bits["reduce_range"] is False


def test_logits_policies(setup):
    for policy, quantized in (("float", False), ("quantize", True)):
        _, out = _quantize(setup, f"logits-{policy}.onnx", logits=policy)
        model = onnx.load(str(out))
        output = model.graph.output[0].name
        producer = next(n for n in model.graph.node if output in n.output)
        assert (producer.op_type == "DequantizeLinear") == quantized, policy
    result, out = _quantize(setup, "logits-exclude.onnx", logits="exclude")
    model = onnx.load(str(out))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    inits = {t.name for t in model.graph.initializer}
    assert gemm.input[1] in inits  # the last layer keeps float weights
    assert result.decisions["excluded_nodes"] == [gemm.name]


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_calibrators(setup, calibrator):
    result, out = _quantize(setup, f"cal-{calibrator}.onnx", calibrator=calibrator)
    assert result.bits["calibrator"] == calibrator
    agreement = np.mean(_run(out, setup["images"]).argmax(1) == reference_logits(setup["images"]).argmax(1))
    assert agreement >= 0.95, agreement  # W8A8 on 40 images (#18 saw a 5-bit model pass the old 0.85)


def test_entropy_calibrator_searches_a_range_for_each_grid(tmp_path):
    """`entropy` took ORT's entropy calibrator with its defaults: 128 histogram bins merged into
    128 quantized bins, one candidate, so its ranges were MinMax's (bit for bit on one batch).
    It now searches 2048 bins for the least KL divergence at the grid's own resolution: heavy
    tails are clipped, more at fewer bits; a tensor crowding its top keeps its range."""
    from dsgonnx.quant.bits import resolve_bits
    from dsgonnx.quant.calibrate import compute_ranges
    from dsgonnx.quant.reader import ArrayReader

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["heavy"], name="relu"),
         helper.make_node("Sigmoid", ["input"], ["flat"], name="sigmoid")],
        "tails", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [16, 4096])],
        [helper.make_tensor_value_info("heavy", onnx.TensorProto.FLOAT, [16, 4096]),
         helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, [16, 4096])])
    path = tmp_path / "tails.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    rng = np.random.default_rng(0)
    images = rng.standard_t(2, (16, 4096)).astype(np.float32)  # heavy tails: a few values far out

    def top(method, bits, name):
        ranges = compute_ranges(path, ArrayReader("input", images, 16), method, resolve_bits(bits, bits, "cpu")[1])
        return float(np.ravel(ranges.data[name].range_value[1])[0])

    observed = float(images.max())
    assert top("minmax", 8, "heavy") == observed
    eight, six = top("entropy", 8, "heavy"), top("entropy", 6, "heavy")
    assert 0 < six < eight < 0.5 * observed
    sigmoid_max = float(1 / (1 + np.exp(-images.max())))
    assert top("entropy", 6, "flat") > 0.95 * sigmoid_max  # nothing to clip: values crowd the top


def test_calibration_collects_in_runs_that_fit_the_memory_available(tmp_path, monkeypatch):
    """The histogram calibrators held every tensor of every batch until the end (MobileNet v1
    0.25 W4A4: 14.8 MiB more peak memory per image, 8.0 GiB for 500). Batches now go in runs
    whose collected outputs stay within a share of the memory available, merged by widening
    the first run's bins, which moves a searched range little. MinMax collects each batch's
    minima and maxima alone, so it never needs more than one run."""
    import dsgonnx.hardware
    from dsgonnx.quant import calibrate
    from dsgonnx.quant.bits import resolve_bits
    from dsgonnx.quant.reader import ArrayReader

    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["heavy"], name="relu"),
         helper.make_node("Sigmoid", ["input"], ["flat"], name="sigmoid")],
        "tails", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 4096])],
        [helper.make_tensor_value_info("heavy", onnx.TensorProto.FLOAT, ["n", 4096]),
         helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, ["n", 4096])])
    path = tmp_path / "tails.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    images = np.random.default_rng(0).standard_t(2, (96, 4096)).astype(np.float32)
    images[0] = np.abs(images[0]).max() / 10 * np.sign(images[0])  # the first batch's range is the narrowest
    made = []

    class Recorded(calibrate._Runs):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(calibrate, "_Runs", Recorded)

    def ranges(method, bits=4):
        found = calibrate.compute_ranges(path, ArrayReader("input", images, 8), method, resolve_bits(bits, bits, "cpu")[1])
        return {name: np.ravel(found.data[name].range_value).astype(float) for name in ("heavy", "flat", "input")}

    whole = {method: ranges(method) for method in ("minmax", "mse", "entropy")}
    values = {"input": images, "heavy": np.maximum(images, 0), "flat": 1 / (1 + np.exp(-np.clip(images, -80, 80)))}

    def grid_error(x, low, high):
        step = (high - low) / 15
        return float(np.mean((np.clip(np.round((x - low) / step), 0, 15) * step + low - x) ** 2))

    assert all(runs.runs == 1 for runs in made)  # this machine's memory holds the 96 images' outputs in one run
    per_batch = 3 * 8 * 4096 * 4  # the input, heavy and flat of one batch of 8
    budget = 3.5 * per_batch
    monkeypatch.setattr(dsgonnx.hardware, "available_memory", lambda: int(budget / calibrate.COLLECTED_MEMORY_SHARE))
    made.clear()
    again = ranges("minmax")
    assert all(np.array_equal(again[name], whole["minmax"][name]) for name in again)
    assert made[0].runs == 1 and made[0].peak < 1024  # MinMax collects each batch's minima and maxima alone
    for method in ("mse", "entropy"):
        made.clear()
        split = ranges(method)
        runs = made[0]
        assert runs.runs == 4 and per_batch * 3 <= runs.peak <= budget, (method, runs.runs, runs.peak)
        for name, (low, high) in split.items():
            # as good a range: the tensor's squared error on a 16-level grid over it within 10 %
            errors = [grid_error(values[name], *pair) for pair in ((low, high), whole[method][name])]
            assert errors[0] <= 1.1 * errors[1], (method, name, (low, high), whole[method][name], errors)
            if method == "mse":  # and the MSE search moves by a few per cent of the range at most
                top = max(abs(whole[method][name]))
                assert np.allclose((low, high), whole[method][name], atol=0.03 * top), (name, low, high)


def test_auto_calibrator_is_mse_at_4_bits_and_searches_the_8_bit_tensors_ranges_for_their_own_grid(setup, monkeypatch):
    import dsgonnx.pipeline
    from dsgonnx.config import Calibrator
    from dsgonnx.quant.calibrate import compute_ranges
    from dsgonnx.quant.reader import ArrayReader

    assert QuantConfig(wbits=8, abits=8).activation_calibrator() == Calibrator.MINMAX
    assert QuantConfig(wbits=4, abits=4, calibrator="minmax").activation_calibrator() == Calibrator.MINMAX
    seen = []

    def spy(prepared, reader, method, activations, specs=None):
        ranges = compute_ranges(prepared, reader, method, activations, specs)
        # the same images' histograms searched for the 4-bit grid everywhere
        images = np.array(reader.images)
        low = compute_ranges(prepared, ArrayReader("input", images, len(images)), method, activations)
        seen.append((method, activations, specs, ranges, low))
        return ranges

    monkeypatch.setattr(dsgonnx.pipeline, "compute_ranges", spy)
    result, out = _quantize(setup, "auto-w4a4.onnx", wbits=4, abits=4)
    ((method, activations, specs, ranges, low),) = seen
    assert result.bits["calibrator"] == "mse" and result.bits["calibrator_chosen_by"].startswith("auto")
    assert Calibrator.parse(method, "calibrator") == Calibrator.MSE and activations.bits == 4
    assert specs["input"].bits == 8  # the model input stays at 8 bits (first_layer_8bit)

    def width(data, name):
        lowest, highest = data.data[name].range_value
        return float(highest) - float(lowest)

    # at 8 bits the search clips the input's tails less than it would for 16 levels
    assert width(ranges, "input") > 1.2 * width(low, "input")
    rest = [name for name in ranges.data if name not in specs]
    assert rest and all(width(ranges, name) == width(low, name) for name in rest)
    # the written model reads the input on the 8-bit grid of that wider range
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    assert np.isclose(float(inits[q.input[1]]), width(ranges, "input") / 255, rtol=1e-3)


def test_synthetic_calibration_and_validation_on_held_out_samples(setup, monkeypatch):
    import dsgonnx.pipeline

    calibrated = []
    ranges = dsgonnx.pipeline.compute_ranges

    def spy(prepared, reader, *args, **kwargs):  # the images ORT calibrates on
        calibrated.append(np.array(reader.images))
        return ranges(prepared, reader, *args, **kwargs)

    monkeypatch.setattr(dsgonnx.pipeline, "compute_ranges", spy)
    result, out = _quantize(setup, "dsg.onnx", calib="dsg", num_samples=8, iters=5, holdout=8, validate=True,
                            preprocess=PRESETS["imagenet"])
    assert result.calibration["method"] == "dsg" and result.calibration["num_samples"] == 8
    report = result.report.to_dict()
    assert report["num_samples"] == 8 and report["labelled"] is False
    # validated on the 8 held-out samples, none of which was calibrated on
    (calibration,) = calibrated
    assert len(calibration) == 8 and len(result.holdout) == 8
    assert not any(np.array_equal(held, seen) for held in result.holdout for seen in calibration)
    assert report["calibration"]["method"] == "dsg" and report["bits"]["weights"] == 8


def test_a_saved_set_holds_out_what_quantize_would_and_the_models_are_checked_on_it(setup, caplog):
    from dsgonnx import synthesize
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.pipeline import _calibration_data

    loaded = load_model(str(setup["model"]))
    config = QuantConfig(calib="dsg", num_samples=8, iters=5, holdout=4, preprocess=PRESETS["imagenet"], validate=True)
    images, held, info, _ = _calibration_data(loaded, config)
    path = setup["folder"] / "held.npz"
    made = synthesize(loaded, config.synth_config(8), holdout=4, output=path, force=True)
    saved = SyntheticSet.load(path)
    # two steps (synthesize, then quantize --calib held.npz) calibrate and check on quantize's own split
    for got in (made, saved):
        np.testing.assert_array_equal(got.images, images)
        np.testing.assert_array_equal(got.holdout, held)
    assert info["holdout"] == saved.meta["holdout"] == 4
    assert not any(np.array_equal(h, c) for h in held for c in images)

    # W4A4: SQuant's rounding is weighed against nearest rounding on the held-out samples, and the
    # model validated on them without val_data
    with caplog.at_level("INFO", logger="dsgonnx"):
        result, _ = _quantize(setup, "held.onnx", calib=str(path), num_samples=8, wbits=4, abits=4, validate=True)
    assert "rounding: the 4 held-out dsg samples decide alone" in caplog.text
    check = result.decisions["rounding"]["against_plain"]
    assert (check["on"], check["samples"]) == ("held-out synthetic samples", 4)
    # held-out DSG samples decide alone: no procedural probe beside them
    assert "procedural" not in check and all(set(s["probes"]) == {check["on"]} for s in check["steps"]), check
    assert result.report.to_dict()["num_samples"] == 4 and result.calibration["holdout"] == 4
    np.testing.assert_array_equal(result.holdout, held)
    fewer, _ = _quantize(setup, "held2.onnx", calib=str(path), num_samples=8, wbits=4, abits=4, holdout=2)
    assert fewer.decisions["rounding"]["against_plain"]["samples"] == 2  # at most --holdout of them
    # held-out Gaussian noise is not what the model was made for: the procedural probe stays beside it
    noise, _ = _quantize(setup, "noise.onnx", calib="gaussian", num_samples=8, wbits=4, abits=4, holdout=4)
    check = noise.decisions["rounding"]["against_plain"]
    assert check["on"] == "held-out synthetic samples" and check["procedural"]["samples"] == FALLBACK_SAMPLES, check

    # the same images without held-out samples: checked on the calibration images, nothing to validate on
    bare = SyntheticSet(saved.images, saved.meta).save(setup["folder"] / "bare.npz")
    with caplog.at_level("INFO", logger="dsgonnx"):
        alone, _ = _quantize(setup, "bare.onnx", calib=str(bare), num_samples=8, wbits=4, abits=4, validate=True)
    check = alone.decisions["rounding"]["against_plain"]
    # the calibration images favour what was fitted to them: procedural images are checked as well
    assert check["on"] == "calibration images" and check["procedural"]["samples"] == FALLBACK_SAMPLES, check
    assert alone.report is None and alone.holdout is None
    assert "holds no held-out samples, so the models are checked on the calibration images" in caplog.text
    # fewer images in the file than asked for: all are used, and quantize says so
    with caplog.at_level("INFO", logger="dsgonnx"):
        short, _ = _quantize(setup, "short.onnx", calib=str(bare), num_samples=len(saved.images) + 5)
    assert short.calibration["num_samples"] == len(saved.images)
    assert f"holds {len(saved.images)} images to calibrate on, fewer than the {len(saved.images) + 5}" in caplog.text


def _image_folder(root, classes=10, per_class=3):
    from PIL import Image

    rng = np.random.default_rng(3)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(128, 60, 3)[None, None] + rng.normal(0, 30, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i:02d}.png")
    return root


def test_an_image_folder_holds_out_unused_files_that_decide_and_validate(setup, tmp_path, caplog):
    from dsgonnx.calibration_data import spread_indices, unused_indices
    from dsgonnx.preprocess import load_image, preprocess_from_preset, scan_image_folder
    from dsgonnx.validation.metrics import sqnr_db

    folder = _image_folder(tmp_path / "photos")
    files = scan_image_folder(str(folder)).files
    with caplog.at_level("INFO", logger="dsgonnx"):
        result, out = _quantize(setup, "photos.onnx", calib=str(folder), num_samples=8, wbits=4, abits=4,
                                validate=True, val_data=str(folder))
    calibrated, held = set(result.calibration_files), result.holdout_files
    # 8 files calibrated on (every 3rd of 30 from the first), 16 of the other 22 held out, spread evenly over them
    assert len(calibrated) == 8 and len(held) == len(set(held)) == 16 and not calibrated & set(held)
    chosen = spread_indices(len(files), 8)
    assert list(held) == [files[i] for i in unused_indices(len(files), chosen, 16)]
    assert result.calibration["holdout"] == 16 and result.calibration["holdout_files"] == list(held)
    # SQuant's rounding and nearest rounding are weighed on the held-out photos alone
    check = result.decisions["rounding"]["against_plain"]
    assert (check["on"], check["samples"]) == ("held-out real images", 16) and "procedural" not in check, check
    assert "the 16 held-out real images decide alone" in caplog.text
    recipe = preprocess_from_preset().for_input_size(16)
    photos = np.stack([load_image(f, recipe) for f in held]).astype(np.float32)
    np.testing.assert_array_equal(result.holdout, photos)
    assert sqnr_db(reference_logits(photos), _run(out, photos)) == pytest.approx(
        check[check["kept"]]["sqnr_db"], abs=1e-2)
    # validated on the same folder: neither the calibrated nor the held-out files are scored
    assert result.report.to_dict()["num_samples"] == 30 - 8 - 16

    # no val_data: validated (agreement with the float model) on the held-out photos
    alone, _ = _quantize(setup, "photos2.onnx", calib=str(folder), num_samples=8, wbits=4, abits=4, validate=True)
    assert alone.report.to_dict()["num_samples"] == 16 and alone.holdout_files == held
    # an array holds out its unused rows the same way
    rows = np.random.default_rng(1).standard_normal((40, 3, 16, 16)).astype(np.float32)
    array, _ = _quantize(setup, "rows.onnx", calib=rows, num_samples=24, wbits=4, abits=4)
    np.testing.assert_array_equal(array.holdout, rows[unused_indices(40, spread_indices(40, 24), 16)])
    assert array.decisions["rounding"]["against_plain"]["on"] == "held-out real images"
    # fewer spare files than --holdout: none held out, the calibration images and procedural images decide
    caplog.clear()
    with caplog.at_level("INFO", logger="dsgonnx"):
        few, _ = _quantize(setup, "few.onnx", calib=str(folder), num_samples=20, wbits=4, abits=4)
    check = few.decisions["rounding"]["against_plain"]
    assert few.holdout is None and few.holdout_files == () and "holdout" not in few.calibration
    assert check["on"] == "calibration images" and check["procedural"]["samples"] == FALLBACK_SAMPLES, check
    assert "has fewer than 16 images beside the 20 calibrated on" in caplog.text
    # --holdout 0: nothing held out
    none, _ = _quantize(setup, "none.onnx", calib=str(folder), num_samples=8, wbits=4, abits=4, holdout=0)
    assert none.holdout is None and none.decisions["rounding"]["against_plain"]["on"] == "calibration images"


def test_saved_synthetic_set_keeps_its_method(setup):
    images = np.random.default_rng(1).standard_normal((10, 3, 16, 16)).astype(np.float32)
    path = SyntheticSet(images, {"method": "zeroq"}).save(setup["folder"] / "set.npz")
    result, _ = _quantize(setup, "from-set.onnx", calib=str(path), num_samples=10)
    assert result.calibration["method"] == "zeroq"


def _cli(*args):
    return CliRunner().invoke(cli, ["quantize", *map(str, args), "--quiet"])


def test_cli_real_data_with_gate(setup):
    out = setup["folder"] / "cli.onnx"
    report = setup["folder"] / "report.json"
    result = _cli(setup["model"], "-o", out, "--calib", setup["calib"], "--val-data", setup["val"],
                  "--max-drop", "50", "--report", report)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and summary["validation"]["fp32"]["top1"] == 100.0
    data = json.loads(report.read_text())
    assert data["bits"]["weights"] == 8 and data["calibration"]["method"] == "real"
    crushed = _cli(setup["model"], "-o", setup["folder"] / "crushed.onnx", "--wbits", "2", "--abits", "2",
                   "--calib", setup["calib"], "--val-data", setup["val"], "--max-drop", "0.5")
    assert crushed.exit_code == 1, crushed.output
    assert "dropped" in crushed.stderr and (setup["folder"] / "crushed.onnx").exists()


def test_default_output_name_follows_bits(setup):
    result = _cli(setup["model"], "--w6a6", "--calib", setup["calib"], "--no-validate")
    assert result.exit_code == 0, result.output
    assert (setup["folder"] / "tiny.w6a6.onnx").exists()
    again = _cli(setup["model"], "--w6a6", "--calib", setup["calib"], "--no-validate")
    assert again.exit_code == 2 and "--force" in again.stderr


def test_cli_policy_flags_reach_the_model(setup):
    out = setup["folder"] / "policies.onnx"
    result = _cli(setup["model"], "--w6a6", "--calib", setup["calib"], "--no-validate", "-o", out, "--force",
                  "--pool-range", "calibrated", "--no-first-layer-8bit")
    assert result.exit_code == 0, result.output
    decisions = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["dsgonnx.decisions"])
    assert decisions["pool_range"] == {"policy": "calibrated", "tensors": []} and "first_layer_8bit" not in decisions
    bad = _cli(setup["model"], "--calib", setup["calib"], "--pool-range", "median")
    assert bad.exit_code == 2 and "--pool-range" in bad.stderr and "Traceback" not in bad.output


def test_cli_synthesis_start_reaches_the_synthesis(setup):
    """quantize --synth-start procedural: the synthetic images start at dead leaves (with no
    iterations, the statistics are the dead leaves', not noise's) and the summary says so."""
    out = setup["folder"] / "leaves.onnx"
    result = _cli(setup["model"], "-o", out, "--calib", "dsg", "--synth-start", "procedural", "--iters", "0",
                  "--num-samples", "4", "--holdout", "0", "--no-validate", "--force")
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["synth"]["start"] == "procedural" and calibration["method"] == "dsg"
    noise = _cli(setup["model"], "-o", out, "--calib", "dsg", "--iters", "0", "--num-samples", "4", "--holdout", "0",
                 "--no-validate", "--force")
    assert json.loads(noise.stdout)["calibration"]["synth"]["start"] == "gaussian"
    assert calibration["diversity"] != json.loads(noise.stdout)["calibration"]["diversity"]
    bad = _cli(setup["model"], "--calib", "dsg", "--synth-start", "leaves")
    assert bad.exit_code == 2 and "--synth-start" in bad.stderr and "Traceback" not in bad.output


def test_reconstruction_synthesizes_from_dead_leaves_on_depthwise_networks_unless_told(setup):
    """With --refine (reconstruction learns from the images) on a model with depthwise
    convolutions, zeroq/dsg start from dead-leaves images unless --synth-start says otherwise,
    and the summary says why; without --refine, with --synth-generator (whose images come from
    latents), or on a model without depthwise convolutions, from noise."""
    from zoo import export_tiny_mobile

    mobile = export_tiny_mobile(setup["folder"] / "mobile.onnx")
    out = setup["folder"] / "leaves-refined.onnx"
    args = ("-o", out, "--calib", "dsg", "--iters", "2", "--num-samples", "4", "--holdout", "0", "--no-validate",
            "--force")
    refine = ("--w6a6", "--refine", "brecq", "--refine-iters", "2")
    refined = CliRunner().invoke(cli, ["quantize", *map(str, (mobile, *args, *refine))])  # (not quiet: stderr says why)
    assert refined.exit_code == 0, refined.output
    calibration = json.loads(refined.stdout)["calibration"]
    assert calibration["synth"]["start"] == "procedural" and calibration["method"] == "dsg"
    assert calibration["start_choice"].startswith("procedural: reconstruction learns from these images and the model "
                                                  "has depthwise convolutions")
    assert "started from dead-leaves images" in refined.stderr and "--synth-start gaussian" in refined.stderr
    for model, extra in ((mobile, ("--synth-start", "gaussian")), (mobile, ("--synth-generator",)),
                         (setup["model"], ())):
        told = json.loads(_cli(model, *args, *refine, *extra).stdout)["calibration"]
        assert told["synth"]["start"] == "gaussian" and "start_choice" not in told
    plain = json.loads(_cli(mobile, *args).stdout)["calibration"]
    assert plain["synth"]["start"] == "gaussian" and "start_choice" not in plain


def test_cli_synthesis_generator_reaches_the_synthesis(setup):
    """quantize --synth-generator: the synthetic images are a learned generator's output
    (other images than the pixels' from the same seed); refused in one line where it has no
    meaning."""
    out = setup["folder"] / "generated.onnx"
    args = ("--calib", "dsg", "--iters", "3", "--num-samples", "4", "--holdout", "0", "--no-validate", "--force")
    result = _cli(setup["model"], "-o", out, "--synth-generator", *args)
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["synth"]["generator"] is True
    pixels = json.loads(_cli(setup["model"], "-o", out, *args).stdout)["calibration"]
    assert pixels["synth"]["generator"] is False and calibration["diversity"] != pixels["diversity"]
    swung = json.loads(_cli(setup["model"], "-o", out, "--synth-swing", *args).stdout)["calibration"]
    assert swung["synth"]["swing"] is True and swung["synth"]["generator"] is False
    assert swung["diversity"] != pixels["diversity"]
    bad = _cli(setup["model"], "-o", out, "--calib", "procedural", "--synth-generator", "--force")
    assert bad.exit_code == 2 and "--synth-generator is for the BN-matching methods" in bad.stderr
    assert "Traceback" not in bad.output


@pytest.fixture()
def bad_inputs(setup, tmp_path):
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 3, 8, 8), np.float32))
    np.savez(tmp_path / "dtype.npz", images=np.zeros((4, 3, 16, 16), np.int64))
    np.savez(tmp_path / "object.npz", images=np.array([{"a": 1}], dtype=object))
    (tmp_path / "empty").mkdir()
    return tmp_path


BAD = [
    (["--wbits", "9"], "unsupported weight bit width 9"),
    (["--wbits", "1", "--abits", "8"], "unsupported weight bit width 1"),
    (["--w4a4", "--target", "trt"], "trt (TensorRT) runs symmetric int8 only"),
    (["--w8a8", "--w4a4"], "give one of"),
    (["--calib", "{tmp}/shape.npz"], "the model takes N×3×16×16"),
    (["--calib", "{tmp}/dtype.npz"], "must be floating point"),
    (["--calib", "{tmp}/object.npz"], ".npz"),
    (["--calib", "{tmp}/empty"], "no images found"),
    (["--calib", "{tmp}/missing"], "calibration data not found"),
    (["-o", "{model}"], "never overwrites its input"),
    (["-o", "{tmp}/nowhere/out.onnx"], "output folder does not exist"),
    # a folder no file can be made in, whatever its permission bits tell root: refused before any work
    (["-o", "/proc/out.onnx"], "output folder is not writable: /proc"),
    (["--report", "/proc/r.json"], "--report: folder /proc is not writable"),
    (["--w4a4", "--keep-candidates", "/proc"], "--keep-candidates folder is not writable: /proc"),
    # QAT's checkpoint is first written after training steps: its place is checked before any work
    (["--w4a4", "--qat", "--qat-checkpoint", "/proc/ck.pt"], "--qat-checkpoint: output folder is not writable: /proc"),
    (["--w4a4", "--qat", "--qat-checkpoint", "{model}"], "--qat-checkpoint {model} is the input model"),
    (["--exclude", "no_such_node"], "no node named 'no_such_node'"),
    # the validation's inputs are checked before any work, not after the model is written
    (["--val-data", "{tmp}/missing"], "--val-data: data not found"),
    (["--report", "{tmp}/nowhere/r.json"], "--report: folder"),
    # a CI gate that cannot be evaluated is refused up front, never passed silently
    (["--max-drop", "1"], "--max-drop needs labelled --val-data"),
    (["--min-agreement", "0.5"], "--min-agreement has nothing to score on"),  # 24 images, --num-samples 64
    (["--min-agreement", "0.5", "--holdout", "0", "--calib", "gaussian"], "--min-agreement has nothing to score on"),
    (["--min-agreement", "0.5", "--no-validate"], "needs the validation, which is off"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_and_writes_nothing(setup, bad_inputs, args, message):
    args = [a.format(tmp=bad_inputs, model=setup["model"]) for a in args]
    if "--calib" not in args:
        args += ["--calib", str(setup["calib"])]
    before = set(os.listdir(setup["folder"])) | set(os.listdir(bad_inputs))
    model_bytes = setup["model"].read_bytes()
    validation = {"--val-data", "--report", "--max-drop", "--min-agreement"} & set(args)
    result = _cli(setup["model"], *args, *([] if validation else ["--no-validate"]))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    message = message.format(model=setup["model"])
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert set(os.listdir(setup["folder"])) | set(os.listdir(bad_inputs)) == before
    assert setup["model"].read_bytes() == model_bytes


def test_a_quantized_model_is_refused_by_name(setup, tmp_path):
    """Its own output given back (a user's slip) is refused in one line saying so; before, ORT's
    calibration on real images raised a KeyError and the torch conversion named an
    unsupported DequantizeLinear."""
    first = tmp_path / "q.onnx"
    done = _cli(setup["model"], "-o", first, "--calib", "gaussian", "--num-samples", "4", "--holdout", "0",
                "--no-validate")
    assert done.exit_code == 0, done.output
    for calib in (str(setup["calib"]), "gaussian"):
        again = _cli(first, "-o", tmp_path / "qq.onnx", "--calib", calib, "--no-validate")
        assert again.exit_code == 2, again.output
        (line,) = again.stderr.strip().splitlines()
        assert "is quantized already" in line and "QuantizeLinear" in line and "give it the float original" in line
        assert sorted(os.listdir(tmp_path)) == ["q.onnx"]


def test_a_model_with_a_fixed_batch_just_works(setup, tmp_path):
    """Batch fixed to 8 in the graph: parity, calibration (4 images, repeated to 8), mixed
    precision's probes (5 held-out samples) and the final check all run whole batches."""
    from dsgonnx import inspect

    model = onnx.load(str(setup["model"]))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = 8
    path = tmp_path / "batch8.onnx"
    onnx.save(model, str(path))
    assert inspect(str(path))["torch_parity"]["top1_agreement"] == 1.0
    result = quantize(str(path), QuantConfig(wbits=6, abits=6, calib="gaussian", num_samples=4, holdout=5, mixed=True,
                                             output=str(tmp_path / "q.onnx")))
    assert result.calibration["num_samples"] == 4 and result.calibration["repeated_to"] == 8
    assert result.report.agreement > 0.5
    logits = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"]).run(
        None, {"input": setup["images"][:8]})[0]
    assert logits.shape == (8, 10) and np.isfinite(logits).all()


def test_a_set_too_large_for_memory_is_refused_with_the_figures_before_any_work(setup, monkeypatch):
    import dsgonnx.hardware

    assert dsgonnx.hardware.available_memory() > 2**20  # this machine's MemAvailable, read from /proc
    monkeypatch.setattr(dsgonnx.hardware, "available_memory", lambda: 10 * 2**20)  # 10 MiB left
    out = setup["folder"] / "huge-set.onnx"
    result = _cli(setup["model"], "--calib", "gaussian", "--num-samples", "1000", "--no-validate", "-o", out)
    # 1000 × 3×16×16 float32 × 6 copies = 17.6 MiB > 10 MiB
    assert result.exit_code == 2 and "--num-samples 1000 images of 3×16×16 need about 17.6 MiB" in result.stderr
    assert not out.exists()
    # the held-out samples are made with them: the error names both (it said --num-samples 1100)
    result = _cli(setup["model"], "--calib", "gaussian", "--num-samples", "100", "--holdout", "1000", "-o", out)
    assert result.exit_code == 2 and "--num-samples + --holdout 1100 images of 3×16×16" in result.stderr, result.stderr
    npz = setup["folder"] / "huge-set.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(setup["model"]), "--method", "gaussian", "--num-samples", "100",
                                      "--holdout", "1000", "-o", str(npz), "--quiet"])
    assert result.exit_code == 2 and "--num-samples + --holdout 1100 images" in result.stderr and not npz.exists()
    assert _cli(setup["model"], "--calib", "gaussian", "--num-samples", "100", "--no-validate", "-o", out,
                "--force").exit_code == 0  # 1.8 MiB fits


def _prepared_weights(setup, tmp_path) -> dict[str, np.ndarray]:
    """The float weights ORT quantizes: BN folded by its pre-processing, as quantize does."""
    from dsgonnx.quant.qdq import pre_process

    prepared = onnx.load(str(pre_process(setup["model"], tmp_path / "prepared.onnx")))
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in prepared.graph.initializer}


def _weights_and_scales(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0][: -len("_quantized")]: (inits[n.input[0]].astype(np.int64), inits[n.input[1]].astype(np.float64))
            for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}


@pytest.mark.parametrize("bits", [6, 4, 3])
def test_weight_grids_are_the_b_bit_grid_fitted_per_channel(setup, tmp_path, bits):
    """Per output channel: the scale is max|w| / (2^(b-1) - 1), the integers are round(w / scale)
    and reach ±(2^(b-1) - 1), so the dequantized weight is within scale/2 of the float one.
    Native INT4 is ONNX Runtime's own symmetric grid over [-8, 7]: max|w| / 7.5, the positive
    extreme clipped to 7 (half a step)."""
    top = 7.5 if bits == 4 else 2 ** (bits - 1) - 1
    low, high = (-8, 7) if bits == 4 else (-top, top)
    _, out = _quantize(setup, f"grid{bits}.onnx", wbits=bits, abits=8 if bits != 4 else 4, first_layer_8bit=False,
                       bias_correction="off", rounding="nearest")  # the grid; SQuant's flips: test_rounding.py
    floats = _prepared_weights(setup, tmp_path)
    grids = _weights_and_scales(onnx.load(str(out)))
    assert set(grids) == {name for name in floats if "_W_" in name}  # both Conv weights
    for name, (ints, scales) in grids.items():
        weight = floats[name]
        expected = np.abs(weight).reshape(len(weight), -1).max(axis=1) / top
        assert np.allclose(scales, expected, rtol=1e-6), name
        extremes = np.abs(ints).reshape(len(ints), -1).max(axis=1)
        assert (extremes == (8 if bits == 4 else top)).all() or bits == 4 and (extremes >= 7).all(), name
        assert ints.min() >= low and ints.max() <= high  # every channel reaches the grid's end, none beyond
        exact = np.clip(weight / scales[:, None, None, None], low, high)  # on the written scale
        assert np.abs(ints - exact).max() <= 0.5 + 1e-5, name  # round to nearest (ties either way: float32)
        assert np.mean(ints == np.round(exact)) > 0.99, name
        assert np.abs(ints * scales[:, None, None, None] - weight).max() <= scales.max() / 2 * (1 + 1e-6)


def test_activation_grids_span_the_calibrated_range_on_the_b_bit_grid(setup, tmp_path):
    """A 6-bit ReLU output: zero point 0 and scale = (its largest value on the calibration
    images) / 63, not / 255 — measured here by running the float model on those images."""
    _, out = _quantize(setup, "act6.onnx", wbits=6, abits=6, first_layer_8bit=False, bias_correction="off")
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    quant = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "/Relu_output_0")
    scale, zero = float(inits[quant.input[1]]), int(inits[quant.input[2]])
    probe = onnx.load(str(setup["model"]))
    probe.graph.output.append(helper.make_tensor_value_info("/Relu_output_0", onnx.TensorProto.FLOAT, None))
    path = tmp_path / "probe.onnx"
    onnx.save(probe, str(path))
    calib = np.load(setup["calib"])["images"]
    relu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": calib})[-1]
    assert zero == 0 and scale == pytest.approx(float(relu.max()) / 63, rel=1e-5)


def test_noise_floor_nudges_each_chosen_bias_integer_by_one_step_and_nothing_else(setup):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from noise_floor import nudge_biases

    _, out = _quantize(setup, "nudged-w8a8.onnx")
    model = onnx.load(str(out))
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    biases = {name for name, value in before.items() if value.dtype == np.int32 and name in dequantized}
    assert biases  # the QDQ model holds int32 biases (else this proves nothing); their zero points stay
    moved = nudge_biases(model, 1.0, np.random.default_rng(0))
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert moved == sum(before[name].size for name in biases)
    for name, value in before.items():
        if name in biases:
            assert np.array_equal(np.abs(after[name].astype(np.int64) - value), np.ones(value.shape))
        else:
            assert np.array_equal(after[name], value)
    assert nudge_biases(model, 0.0, np.random.default_rng(0)) == 0


def _export_sequential(path, *head):
    """Two conv-BN-ReLU layers on 3×16×16 images, then ``head``, exported with BN kept (input
    ``input``, output ``logits``, dynamic batch)."""
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                        nn.BatchNorm2d(16), nn.ReLU(), *head).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=13,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return path


def test_a_max_pool_between_4_bit_activations_runs_in_float(tmp_path):
    """ORT's QDQ MaxPool reads its input's integers, and ONNX Runtime has no 4-bit MaxPool: a W4A4
    model with one between two layers was refused by ORT's session ('tensor(uint4) ... MaxPool').
    It runs in float between a DequantizeLinear and the next QuantizeLinear, and the model runs."""
    from torch import nn

    path = _export_sequential(tmp_path / "pool.onnx", nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1),
                              nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    out = tmp_path / "pool.w4a4.onnx"
    result = quantize(str(path), QuantConfig(wbits=4, abits=4, num_samples=16, iters=5, holdout=0, validate=False,
                                             output=str(out)))
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    pool = next(n for n in model.graph.node if n.op_type == "MaxPool")
    assert producers[pool.input[0]].op_type == "DequantizeLinear" and pool.name in result.decisions["excluded_nodes"]
    readers = [n for n in model.graph.node if pool.output[0] in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]  # the next layer's input is 4-bit again
    images = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_what_follows_a_float_final_conv_stays_float(tmp_path, bits):
    """A SqueezeNet-style head (the classifier a 1×1 Conv, then ReLU, global pooling, softmax)
    with the final layer kept float: the pooled class scores were quantized on the grid of the
    final layer's per-pixel range (the shared SqueezeNet's W6A6 with real images: 47.22, and
    60.11 with that tensor float), and at 4 bits ORT fused DequantizeLinear -> Conv -> ReLU ->
    QuantizeLinear into a QLinearConv without a 4-bit kernel (the session refused the model).
    Nothing after the final layer is quantized now, at any width, and the model runs."""
    from torch import nn

    from dsgonnx.quant.qdq import downstream

    path = _export_sequential(tmp_path / "head.onnx", nn.Conv2d(16, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Softmax(dim=1))
    out = tmp_path / f"head.w{bits}a{bits}.onnx"
    result = quantize(str(path), QuantConfig(wbits=bits, abits=bits, num_samples=16, iters=5, holdout=0,
                                             validate=False, output=str(out)))
    model = onnx.load(str(out))
    final = next(n for n in model.graph.node if n.name == result.decisions["final_layer"])
    after = downstream(model, final.output[0])
    assert not [n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in after]
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[final.input[0]].op_type == "DequantizeLinear"  # the final layer's input is quantized
    images = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    probs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_synthetic_calibration_of_a_depthwise_network_at_4_bits_points_to_a_handful_of_photos(setup):
    """Below 5 bits on a network with depthwise convolutions, quantize says (before synthesizing)
    that a few photos beat synthetic images there; not at 8 bits, not without depthwise
    convolutions, not when it calibrates on images already."""
    from zoo import export_tiny_mobile

    mobile = export_tiny_mobile(setup["folder"] / "hint-mobile.onnx")
    out = setup["folder"] / "hint.onnx"
    args = ("-o", out, "--num-samples", "4", "--holdout", "0", "--no-validate", "--force")
    said = "a handful of photos like the model's inputs where measured; with 16 or more at hand, try --calib"
    hinted = CliRunner().invoke(cli, ["quantize", *map(str, (mobile, "--w4a4", "--calib", "gaussian", *args))])
    assert hinted.exit_code == 0, hinted.output
    assert said in hinted.stderr
    w8a4 = ("--wbits", "8", "--abits", "4")
    for model, bits, calib in ((mobile, ("--w8a8",), "gaussian"), (mobile, w8a4, "procedural"),
                               (setup["model"], ("--w4a4",), "gaussian"), (mobile, ("--w4a4",), setup["calib"])):
        quiet = CliRunner().invoke(cli, ["quantize", *map(str, (model, *bits, "--calib", calib, *args))])
        assert quiet.exit_code == 0, quiet.output
        assert (said in quiet.stderr) == (bits[-1] == "4"), (model, bits, calib)  # W8A4 too


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
def test_mse_search_picks_the_candidate_of_least_expected_error(symmetric):
    """The MSE search, summed by term over all candidates at once, picks the candidate that
    the error written out bin by bin for each candidate ranks first (the first of equals)."""
    from onnxruntime.quantization import QuantType

    from dsgonnx.quant.bits import BitSpec
    from dsgonnx.quant.calibrate import mse_range

    rng = np.random.default_rng(3)
    spec = BitSpec(4, QuantType.QInt4 if symmetric else QuantType.QUInt4, symmetric)
    levels, steps = spec.levels[1] - spec.levels[0], 40
    factors = np.linspace(1 / steps, 1, steps)
    for values in (rng.standard_t(3, 20000), np.maximum(rng.normal(size=20000), 0) * 3, rng.normal(2, 0.1, 20000)):
        hist, edges = np.histogram(values, bins=2048)
        low, high = min(values.min(), 0.0), max(values.max(), 0.0)
        top = max(abs(low), abs(high))
        pairs = [(-top * f, top * f) for f in factors] if symmetric else [(low * f, high * g) for f in factors for g in factors]
        centres = 0.5 * (edges[:-1] + edges[1:])

        def error(lo, hi):
            step = (hi - lo) / levels
            per_bin = np.where(centres < lo, (centres - lo) ** 2, np.where(centres > hi, (centres - hi) ** 2, step**2 / 12))
            return float(per_bin @ hist) if hi > lo else np.inf

        errors = [error(*pair) for pair in pairs]
        chosen = mse_range(hist, edges, values.min(), values.max(), spec).range_value
        expected = pairs[int(np.argmin(errors))]
        assert np.allclose(np.ravel(chosen), expected, rtol=1e-6), (chosen, expected)
    # nothing but zeros: no candidate has a width, and the observed range is kept
    zeros, edges = np.histogram(np.zeros(10), bins=2048, range=(0, 0))
    assert np.ravel(mse_range(zeros, edges, 0.0, 0.0, spec).range_value).tolist() == [0.0, 0.0]


def test_entropy_search_is_onnx_runtimes_value_for_value():
    """The KL search with array operations finds the window ORT's own loops find, on heavy
    tails, ReLU-like spikes with holes, and narrow bumps, with windows that are no multiple
    of the merged bins (a remainder) and merged bins of 2 to 24."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from dsgonnx.quant.calibrate import _entropy_threshold

    rng = np.random.default_rng(5)
    for case in range(24):
        values = (rng.standard_t(1 + case % 4, 3000), np.maximum(rng.normal(size=3000), 0) ** (1 + case % 3),
                  rng.normal(3, 0.1 + case / 50, 3000))[case % 3]
        hist, edges = np.histogram(values, bins=128)
        hist[rng.integers(0, 128, 6)] = 0  # empty bins: q spreads over the non-empty ones
        quantized = (2, 5, 8, 12, 16, 24)[case % 6]
        low, high = np.float32(values.min()), np.float32(values.max())
        ours = _entropy_threshold(hist, edges, low, high, quantized)
        theirs = HistogramCollector("entropy", False, 128, quantized, None, None).get_entropy_threshold(
            (hist, edges, low, high, float(max(abs(edges[0]), abs(edges[-1])))), quantized)
        assert [float(v) for v in ours] == [float(v) for v in theirs], (case, ours, theirs)
