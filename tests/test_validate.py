"""`dsgonnx validate`: real ONNX Runtime runs of a tiny classifier and crushed copies of it.

The tiny model (Conv -> ReLU -> GlobalAveragePool -> Flatten -> Gemm, 10 classes, 3x8x8) is
built with onnx.helper; its "crushed" copy has its weights rounded to a 2-bit grid, so its
predictions really change. Nothing is mocked: every number comes from ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from dsgonnx.errors import AccuracyGateError, DsgonnxError
from dsgonnx.preprocess import preprocess_from_preset
from dsgonnx.validation import ValidateConfig, check_gate, evaluate_gate, validate
from dsgonnx_cli.main import cli

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
MODELS = SHARED / "models"
IMAGENET = SHARED / "datasets" / "imagenet-samples"
CIFAR = SHARED / "datasets" / "cifar10-test"
NUM_CLASSES = 10


# --- tiny models ----------------------------------------------------------------------------


def tiny_model(hw=(8, 8), batch="N", seed=0, softmax=False, dtype=TensorProto.FLOAT, channels=3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = {
        "W": rng.normal(0, 0.5, (16, channels, 3, 3)),
        "b": rng.normal(0, 0.1, 16),
        "G": rng.normal(0, 1, (NUM_CLASSES, 16)),
        "c": rng.normal(0, 0.1, NUM_CLASSES),
    }
    nodes = [
        helper.make_node("Conv", ["input", "W", "b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
        helper.make_node("Flatten", ["pool"], ["flat"]),
        helper.make_node("Gemm", ["flat", "G", "c"], ["logits" if not softmax else "gemm"], transB=1),
    ]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["gemm"], ["logits"], axis=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", dtype, [batch, channels, *hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, NUM_CLASSES])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def crushed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with W and G rounded to 4 levels (2 bits, symmetric scale)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    for tensor in copy.graph.initializer:
        if tensor.name in ("W", "G"):
            values = numpy_helper.to_array(tensor)
            scale = np.abs(values).max() / 2
            grid = (np.clip(np.round(values / scale), -2, 1) * scale).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(grid, tensor.name))
    return copy


def tiny_images(n=200, seed=1, hw=(8, 8)) -> np.ndarray:
    """Per-sample colour offsets plus noise: enough variety for the tiny model to use all classes."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, 3, 1, 1)) + 0.5 * rng.normal(0, 1, (n, 3, *hw))).astype(np.float32)


def ort_outputs(path, images) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Paths of the tiny FP model, its crushed copy, and a labelled / unlabelled .npz."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {"fp": root / "fp.onnx", "crushed": root / "crushed.onnx", "root": root}
    model = tiny_model()
    onnx.save(model, paths["fp"])
    onnx.save(crushed(model), paths["crushed"])
    images = tiny_images()
    labels = ort_outputs(paths["fp"], images).argmax(1)
    labels[::4] = (labels[::4] + 3) % NUM_CLASSES  # FP top-1 is then exactly 75%
    paths["labelled"] = root / "labelled.npz"
    paths["unlabelled"] = root / "unlabelled.npz"
    np.savez(paths["labelled"], images=images, labels=labels)
    np.savez(paths["unlabelled"], images=images)
    return paths


def run_cli(*args):
    result = CliRunner().invoke(cli, ["validate", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsgonnx: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- the gate -----------------------------------------------------------------------------------


def test_gate_fails_at_a_tight_threshold_and_holds_at_a_loose_one(tiny, tmp_path):
    report_path = tmp_path / "report.json"
    tight = run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["labelled"], "--max-drop", "1", "--report", report_path)
    assert_one_line_error(tight, 1, "accuracy gate failed: top-1 dropped", "more than --max-drop 1")
    report = json.loads(report_path.read_text())  # the report is written even when the gate fails
    assert report["gate"]["passed"] is False and report["drop_top1"] > 1
    assert "FAILED" in tight.stdout

    loose = run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["labelled"], "--max-drop", "100")
    assert loose.exit_code == 0, loose.stderr
    assert "PASSED" in loose.stdout and loose.stderr == ""


def test_gate_threshold_is_inclusive_and_exact(tiny):
    report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(tiny["labelled"])))
    drop = report.drop_top1
    assert drop > 0
    assert check_gate(report, max_drop=drop).passed  # drop == threshold holds: "fails when drop > max"
    with pytest.raises(AccuracyGateError) as failure:
        check_gate(report, max_drop=drop - 0.5)
    assert failure.value.exit_code == 1 and "0.50 points more than" in str(failure.value)


def test_agreement_gate_on_unlabelled_data(tiny):
    strict = run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["unlabelled"], "--min-agreement", "0.99")
    assert_one_line_error(strict, 1, "agreement", "below --min-agreement 0.99")
    assert run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["unlabelled"], "--min-agreement", "0.1").exit_code == 0
    # --max-drop cannot be evaluated without labels: an input error, not a silent pass
    assert_one_line_error(
        run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["unlabelled"], "--max-drop", "1"), 2, "needs labelled data"
    )


def test_same_model_passes_every_gate(tiny):
    result = run_cli(tiny["fp"], tiny["fp"], "--data", tiny["labelled"], "--max-drop", "0", "--min-agreement", "1")
    assert result.exit_code == 0, result.stderr
    assert "inf (identical outputs)" in result.stdout


# --- metrics against a hand computation -------------------------------------------------------------


def test_metrics_match_a_hand_computation(tiny, tmp_path):
    report_path = tmp_path / "r.json"
    result = run_cli(tiny["fp"], tiny["crushed"], "--data", tiny["labelled"], "--batch-size", "7", "--report", report_path)
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())

    with np.load(tiny["labelled"]) as data:
        images, labels = data["images"], data["labels"]
    fp = ort_outputs(tiny["fp"], images).astype(np.float64)
    q = ort_outputs(tiny["crushed"], images).astype(np.float64)
    n = len(labels)
    fp_top1 = 100 * np.sum(fp.argmax(1) == labels) / n
    q_top1 = 100 * np.sum(q.argmax(1) == labels) / n
    fp_top5 = 100 * np.mean([labels[i] in np.argsort(-fp[i])[:5] for i in range(n)])
    q_top5 = 100 * np.mean([labels[i] in np.argsort(-q[i])[:5] for i in range(n)])
    agreement = np.mean(fp.argmax(1) == q.argmax(1))
    sqnr = 10 * np.log10(np.sum(fp**2) / np.sum((fp - q) ** 2))
    p = np.exp(fp) / np.exp(fp).sum(1, keepdims=True)
    r = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    kl = np.mean(np.sum(p * np.log(p / r), axis=1))

    assert fp_top1 == 75.0 and report["fp32"]["top1"] == 75.0
    assert report["quantized"]["top1"] == pytest.approx(q_top1)
    assert report["fp32"]["top5"] == pytest.approx(fp_top5)
    assert report["quantized"]["top5"] == pytest.approx(q_top5)
    assert report["drop_top1"] == pytest.approx(fp_top1 - q_top1)
    assert report["agreement"] == pytest.approx(agreement)
    assert report["sqnr_db"] == pytest.approx(sqnr, rel=1e-5)
    assert report["kl"] == pytest.approx(kl, rel=1e-5)
    assert q_top1 < fp_top1 - 10 and agreement < 0.8  # the crushed model really is worse
    assert report["num_samples"] == n and report["num_classes"] == NUM_CLASSES and report["labelled"] is True
    assert report["output_kind"] == "logits" and report["batch_size"] == 7
    assert report["latency_batches"] == n // 7  # full batches only
    assert report["latency_ms"]["fp32"] > 0 and report["latency_ms"]["quantized"] > 0


def test_report_has_the_documented_keys(tiny, tmp_path):
    path = tmp_path / "r.json"
    extra = {"bits": 2, "simulated": True, "calibration": {"method": "dsg", "num_samples": 4, "iters": 1, "seconds": np.float32(0.5)}}
    report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(tiny["labelled"]), report_path=str(path), extra=extra, max_drop=50))
    saved = json.loads(path.read_text())
    assert saved == json.loads(report.to_json()) and saved["calibration"]["seconds"] == 0.5
    for key in ("schema_version", "fp32", "quantized", "drop_top1", "agreement", "sqnr_db", "kl", "providers",
                "onnxruntime", "cpu", "latency_ms", "batch_size", "gate", "bits", "simulated", "calibration"):
        assert key in saved, key
    assert saved["providers"] == {"fp32": ["CPUExecutionProvider"], "quantized": ["CPUExecutionProvider"]} or \
        "CUDAExecutionProvider" in saved["providers"]["fp32"]
    assert saved["onnxruntime"] == ort.__version__
    assert set(saved["cpu"]) >= {"isa", "avx2", "avx512", "vnni"}
    assert set(saved["latency_ms"]) == {"fp32", "quantized"}
    assert saved["gate"] == {"max_drop": 50, "min_agreement": None, "passed": True, "message": report.gate.message}
    assert saved["data"]["kind"] == "npz" and saved["data"]["preprocess"] is None
    assert not [f for f in os.listdir(tmp_path) if f != "r.json"]  # no temporary file left behind
    with pytest.raises(ValueError, match="overwrite standard keys"):
        validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(tiny["labelled"]), extra={"agreement": 1}))


def test_in_memory_images_for_held_out_synthetic_samples(tiny):
    images = tiny_images(n=30, seed=7)
    report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(min_agreement=0.0), images=images)
    assert not report.labelled and report.to_dict()["fp32"]["top1"] is None
    assert report.to_dict()["data"]["kind"] == "in-memory"
    expected = np.mean(ort_outputs(tiny["fp"], images).argmax(1) == ort_outputs(tiny["crushed"], images).argmax(1))
    assert report.agreement == pytest.approx(expected)
    assert evaluate_gate(report, min_agreement=1.0).passed is False
    with pytest.raises(DsgonnxError, match="needs labelled data"):
        evaluate_gate(report, max_drop=1.0)


def test_a_saved_set_is_scored_on_its_held_out_samples(tiny, tmp_path, caplog):
    """`validate --data set.npz` of a set written with held-out samples scores those, not the
    calibration images the quantized model was fitted to."""
    from dsgonnx import SyntheticSet

    calib, held = tiny_images(n=40, seed=3), tiny_images(n=12, seed=4)
    path = SyntheticSet(calib, {"method": "dsg"}, held).save(tmp_path / "set.npz")
    with caplog.at_level("INFO", logger="dsgonnx"):
        report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(path)))
    assert report.to_dict()["num_samples"] == 12 and not report.labelled
    expected = np.mean(ort_outputs(tiny["fp"], held).argmax(1) == ort_outputs(tiny["crushed"], held).argmax(1))
    assert report.agreement == pytest.approx(expected)
    assert "scoring its 12 held-out samples, not the 40 calibration images" in caplog.text
    # labels make it a labelled data set: its images are scored
    np.savez(tmp_path / "labelled.npz", images=calib, labels=np.zeros(40, np.int64), holdout=held)
    assert validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(tmp_path / "labelled.npz"))).labelled


def test_softmax_outputs_are_detected_and_not_softmaxed_again(tmp_path):
    onnx.save(tiny_model(softmax=True), tmp_path / "fp.onnx")
    onnx.save(crushed(tiny_model(softmax=True)), tmp_path / "q.onnx")
    images = tiny_images(n=40)
    report = validate(tmp_path / "fp.onnx", tmp_path / "q.onnx", images=images)
    p = ort_outputs(tmp_path / "fp.onnx", images).astype(np.float64)
    r = ort_outputs(tmp_path / "q.onnx", images).astype(np.float64)
    assert report.metrics.output_kind == "probabilities"
    assert report.metrics.kl == pytest.approx(np.mean(np.sum(p * np.log(p / r), axis=1)), rel=1e-5)


def quantize_w8a8(fp_path, q_path, calibration_images, reduce_range=False):
    """A real QDQ W8A8 copy (per-channel int8 weights, uint8 activations) by onnxruntime.quantization."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = iter([{"input": image[None]} for image in calibration_images])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    quantize_static(str(fp_path), str(q_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(q_path).graph.node)


def test_nan_outputs_are_counted_and_fail_the_gate(tiny, tmp_path):
    broken = tiny_model()
    for tensor in broken.graph.initializer:
        if tensor.name == "c":
            tensor.CopyFrom(numpy_helper.from_array(np.full(NUM_CLASSES, np.nan, np.float32), "c"))
    onnx.save(broken, tmp_path / "nan.onnx")
    report = validate(tiny["fp"], tmp_path / "nan.onnx", ValidateConfig(data=str(tiny["labelled"]), max_drop=10))
    saved = report.to_dict()
    assert saved["nonfinite_outputs"] == {"fp32": 0, "quantized": 200}
    assert saved["sqnr_db"] is None and saved["kl"] is None and saved["gate"]["passed"] is False
    assert json.loads(report.to_json())["quantized"]["top1"] < 20  # all-NaN rows: every score ties, class 0 wins


def test_ort_quantized_w8a8_copy_stays_close(tiny, tmp_path):
    """A real QDQ model: small drop, high agreement, so both gates hold."""
    q_path = tmp_path / "w8a8.onnx"
    quantize_w8a8(tiny["fp"], q_path, tiny_images(n=32, seed=11))  # not the validation images
    result = run_cli(tiny["fp"], q_path, "--data", tiny["labelled"], "--max-drop", "5", "--min-agreement", "0.9")
    assert result.exit_code == 0, result.stdout + result.stderr


# --- image folders ---------------------------------------------------------------------------------


def _write_image_folder(root: Path, class_names, per_class=3, size=(10, 12)):
    rng = np.random.default_rng(5)
    for name in class_names:
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            pixels = np.clip(rng.normal(128, 60, 3)[None, None] + rng.normal(0, 20, (*size[::-1], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_equals_the_same_images_as_npz(tiny, tmp_path):
    """Labels = sorted folder names, and decoding/preprocessing gives what a hand pipeline gives."""
    names = ["kiwi", "apple", "fig", "date", "lime", "pear", "plum", "sloe", "yuzu", "cherry"]
    _write_image_folder(tmp_path / "imgs", names)
    folder_report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(
        data=str(tmp_path / "imgs"), preprocess=preprocess_from_preset("imagenet", resize=8)))

    images, labels = [], []
    for label, name in enumerate(sorted(names)):
        for file in sorted((tmp_path / "imgs" / name).iterdir()):
            image = Image.open(file).convert("RGB").resize((8, 9), Image.BILINEAR)  # 10x12 -> short side 8
            pixels = np.asarray(image, np.float32)[0:8] / 255  # centre crop rows round(1/2)=0 .. 8
            pixels = (pixels - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
            images.append(pixels.transpose(2, 0, 1))
            labels.append(label)
    np.savez(tmp_path / "same.npz", images=np.stack(images), labels=np.array(labels))
    npz_report = validate(tiny["fp"], tiny["crushed"], ValidateConfig(data=str(tmp_path / "same.npz")))

    assert folder_report.metrics.num_samples == 30
    for key in ("fp_top1", "q_top1", "fp_top5", "agreement"):
        assert getattr(folder_report.metrics, key) == getattr(npz_report.metrics, key), key
    assert folder_report.metrics.sqnr_db == pytest.approx(npz_report.metrics.sqnr_db, rel=1e-5)
    assert folder_report.data["kind"] == "image-folder" and folder_report.data["preprocess"]["crop"] == 8


def test_a_grey_model_is_calibrated_and_validated_on_image_files(tmp_path):
    """A model of one channel (MNIST-like) takes image files as grey: quantize calibrates on a
    folder of colour images, validate scores on a labelled folder. Before, calibration fed it
    three channels (an internal error) and validate refused the folder."""
    from dsgonnx import QuantConfig, quantize

    onnx.save(tiny_model(channels=1), tmp_path / "grey.onnx")
    _write_image_folder(tmp_path / "calib", ["x"], per_class=8)
    _write_image_folder(tmp_path / "val", [f"c{i}" for i in range(NUM_CLASSES)], per_class=2)
    recipe = preprocess_from_preset("none", mean="128", std="64")
    done = quantize(str(tmp_path / "grey.onnx"), QuantConfig(calib=str(tmp_path / "calib"), preprocess=recipe,
                                                             output=str(tmp_path / "q.onnx"), validate=False))
    assert done.calibration["num_samples"] == 8
    result = run_cli(tmp_path / "grey.onnx", tmp_path / "q.onnx", "--data", tmp_path / "val", "--preprocess", "none",
                     "--mean", "128", "--std", "64", "--min-agreement", "0.5", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["num_samples"] == 2 * NUM_CLASSES and report["quantized"]["top1"] is not None


def test_nhwc_models_get_channels_last_images(tmp_path):
    """TensorFlow-style N×H×W×3 input: the loader transposes, the result equals the NCHW model's."""
    nchw = tiny_model()
    nhwc = tiny_model()
    graph = nhwc.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8, 8, 3]))
    graph.node[0].input[0] = "nchw"
    graph.node.insert(0, helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
    onnx.save(nchw, tmp_path / "nchw.onnx")
    onnx.save(nhwc, tmp_path / "nhwc.onnx")
    onnx.save(crushed(nhwc), tmp_path / "nhwc_q.onnx")
    onnx.save(crushed(nchw), tmp_path / "nchw_q.onnx")
    _write_image_folder(tmp_path / "imgs", [f"c{i}" for i in range(NUM_CLASSES)], per_class=2, size=(8, 8))
    config = ValidateConfig(data=str(tmp_path / "imgs"), preprocess=preprocess_from_preset("none"))
    a = validate(tmp_path / "nchw.onnx", tmp_path / "nchw_q.onnx", config).metrics
    b = validate(tmp_path / "nhwc.onnx", tmp_path / "nhwc_q.onnx", config).metrics
    assert (a.fp_top1, a.q_top1, a.agreement) == (b.fp_top1, b.q_top1, b.agreement)


def test_fixed_batch_models_run_one_at_a_time_and_fp16_inputs_are_fed_fp16(tmp_path):
    """A 1×3×8×8 float16 input (like the SqueezeNet in ../shared): ORT rejects anything but fp16."""
    fp16 = tiny_model(batch=1, dtype=TensorProto.FLOAT16)
    fp16.graph.node.insert(0, helper.make_node("Cast", ["input"], ["input32"], to=TensorProto.FLOAT))
    fp16.graph.node[1].input[0] = "input32"
    onnx.save(fp16, tmp_path / "fp16.onnx")
    onnx.save(crushed(fp16), tmp_path / "fp16_q.onnx")
    images = tiny_images(n=9)
    labels = np.arange(9) % NUM_CLASSES
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    report = validate(tmp_path / "fp16.onnx", tmp_path / "fp16_q.onnx",
                      ValidateConfig(data=str(tmp_path / "d.npz"), batch_size=4))
    assert report.batch_size == 1 and report.latency_batches == 9 and report.metrics.num_samples == 9

    def by_hand(path):
        return np.concatenate([ort_outputs(path, image[None].astype(np.float16)) for image in images])

    fp, q = by_hand(tmp_path / "fp16.onnx"), by_hand(tmp_path / "fp16_q.onnx")
    assert report.metrics.agreement == pytest.approx(np.mean(fp.argmax(1) == q.argmax(1)))
    assert report.metrics.fp_top1 == pytest.approx(100 * np.mean(fp.argmax(1) == labels))


def test_fixed_batch_larger_than_one_pads_the_last_batch(tiny, tmp_path):
    onnx.save(tiny_model(batch=4), tmp_path / "b4.onnx")
    onnx.save(crushed(tiny_model(batch=4)), tmp_path / "b4_q.onnx")
    with np.load(tiny["labelled"]) as data:
        images, labels = data["images"][:198], data["labels"][:198]  # 49 batches of 4, then 2 + 2 copies
    fixed = validate(tmp_path / "b4.onnx", tmp_path / "b4_q.onnx", ValidateConfig(batch_size=64), images=images, labels=labels)
    dynamic = validate(tiny["fp"], tiny["crushed"], images=images, labels=labels)
    assert fixed.batch_size == 4 and fixed.metrics.num_samples == 198 and fixed.latency_batches == 49
    assert (fixed.metrics.fp_top1, fixed.metrics.q_top1, fixed.metrics.agreement) == \
        (dynamic.metrics.fp_top1, dynamic.metrics.q_top1, dynamic.metrics.agreement)


def test_cuda_failure_reason_is_read_from_the_onnxruntime_log():
    from dsgonnx.validation.sessions import _cuda_failure_reason

    log = (
        "\x1b[1;31m2026-11-23 14:28:59.005 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] ... "
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared "
        "object file: No such file or directory\n\x1b[m\n"
    )
    assert _cuda_failure_reason(log) == "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    assert "without saying why" in _cuda_failure_reason("")


# --- bad input: exit 2, one line, no report --------------------------------------------------------------


@pytest.fixture(scope="module")
def bad(tiny):
    """Files for the bad-input cases, next to the tiny models."""
    root = tiny["root"] / "bad"
    root.mkdir()
    images = tiny_images(n=10)
    (root / "not_onnx.onnx").write_text("hello")
    np.savez(root / "nokey.npz", pixels=images)
    np.savez(root / "uint8.npz", images=(images * 0).astype(np.uint8))
    np.savez(root / "shape.npz", images=np.zeros((10, 3, 9, 9), np.float32))
    np.savez(root / "range.npz", images=images, labels=np.arange(10) + 1)  # label 10 with 10 classes
    np.savez(root / "float_labels.npz", images=images, labels=np.zeros(10, np.float32))
    (root / "fake.npz").write_bytes(b"\x00" * 64)
    (root / "empty").mkdir()
    _write_image_folder(root / "three_classes", ["a", "b", "c"], per_class=1)
    _write_image_folder(root / "corrupt", [f"c{i}" for i in range(NUM_CLASSES)], per_class=1)
    (root / "corrupt" / "c3" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    onnx.save(tiny_model(hw=(16, 16)), root / "other_input.onnx")
    onnx.save(tiny_model(hw=("H", "W")), root / "dynamic_hw.onnx")
    _write_image_folder(root / "ten", [f"c{i}" for i in range(NUM_CLASSES)], per_class=1)
    quantize_w8a8(tiny["fp"], root / "w8a8.onnx", tiny_images(n=8, seed=11))
    return root


BAD_CASES = {
    # id: (args after the two models (None = default tiny pair), models override, message fragment)
    "missing model": (["--data", "{labelled}"], ("{root}/nope.onnx", "{crushed}"), "model file not found"),
    "not onnx": (["--data", "{labelled}"], ("{fp}", "{bad}/not_onnx.onnx"), "cannot load ONNX model"),
    "different inputs": (["--data", "{labelled}"], ("{fp}", "{bad}/other_input.onnx"), "different inputs"),
    "no data": ([], None, "no data to validate on"),
    "missing data": (["--data", "{root}/nothing"], None, "data not found"),
    "empty folder": (["--data", "{bad}/empty"], None, "no images found"),
    "unreadable image": (["--data", "{bad}/corrupt", "--resize", "8"], None, "zz_broken.jpg"),
    "class count": (["--data", "{bad}/three_classes", "--resize", "8"], None, "3 class folders but the models output 10"),
    "npz missing key": (["--data", "{bad}/nokey.npz"], None, "no 'images'"),
    "npz dtype": (["--data", "{bad}/uint8.npz"], None, "floating point"),
    "npz shape": (["--data", "{bad}/shape.npz"], None, "the models take N×3×8×8"),
    "label range": (["--data", "{bad}/range.npz"], None, "label 10"),
    "label dtype": (["--data", "{bad}/float_labels.npz"], None, "'labels' must be integers"),
    "not npz": (["--data", "{bad}/fake.npz"], None, "is not an .npz file"),
    "negative max drop": (["--data", "{labelled}", "--max-drop", "-1"], None, "--max-drop must be"),
    "agreement > 1": (["--data", "{labelled}", "--min-agreement", "1.5"], None, "--min-agreement must be"),
    "batch size": (["--data", "{labelled}", "--batch-size", "0"], None, "--batch-size"),
    "bad mean": (["--data", "{bad}/ten", "--mean", "1,2"], None, "mean must be one number or three"),
    "crop mismatch": (["--data", "{bad}/ten", "--crop", "16"], None, "crop 16 does not match"),
    "dynamic hw": (["--data", "{bad}/ten"], ("{bad}/dynamic_hw.onnx", "{bad}/dynamic_hw.onnx"), "give the crop size"),
    "preprocess on npz": (["--data", "{labelled}", "--preprocess", "inception"], None, "does not apply to an .npz"),
    "report folder": (["--data", "{labelled}", "--report", "{root}/no/such/dir/r.json"], None, "does not exist"),
    "classes file": (["--data", "{bad}/ten", "--classes", "{root}/none.txt"], None, "cannot read class list"),
    "swapped models": (["--data", "{labelled}"], ("{bad}/w8a8.onnx", "{fp}"), "the models look swapped"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny, bad, tmp_path):
    args, models, fragment = BAD_CASES[case]
    names = {key: str(value) for key, value in tiny.items()} | {"bad": str(bad)}
    models = [m.format(**names) for m in (models or ("{fp}", "{crushed}"))]
    args = [a.format(**names) for a in args]
    if "--report" not in args:
        args += ["--report", str(tmp_path / "report.json")]
    result = run_cli(*models, *args)
    assert_one_line_error(result, 2, fragment)
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []  # no report, no temporary file


def test_two_quantized_models_are_compared_as_asked(tiny, bad):
    """Only a quantized model given first beside a float one is taken for swapped arguments."""
    result = run_cli(bad / "w8a8.onnx", bad / "w8a8.onnx", "--data", tiny["labelled"], "--min-agreement", "1")
    assert result.exit_code == 0, result.stdout + result.stderr


def test_cuda_provider_runs_on_cuda_or_exits_2(tiny):
    result = run_cli(tiny["fp"], tiny["fp"], "--data", tiny["labelled"], "--provider", "cuda")
    if result.exit_code == 0:  # a machine with a working GPU
        assert "CUDAExecutionProvider" in result.stdout
    else:
        assert_one_line_error(result, 2, "--provider cuda")
    auto = run_cli(tiny["fp"], tiny["fp"], "--data", tiny["labelled"], "--provider", "auto")
    assert auto.exit_code == 0 and auto.stderr == ""  # ORT's CUDA loader noise stays hidden


# --- as a real process -------------------------------------------------------------------------------------------

_NO_TORCH_MAIN = (
    "import sys; sys.modules['torch'] = None\n"  # any `import torch` would now fail
    "from dsgonnx_cli.main import main; sys.argv[0] = 'dsgonnx'; main()"
)


def _process(*args):
    return subprocess.run([sys.executable, "-c", _NO_TORCH_MAIN, "validate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_subprocess_exit_codes_and_one_line_stderr_without_torch(tiny, tmp_path):
    fail = _process(tiny["fp"], tiny["crushed"], "--data", tiny["labelled"], "--max-drop", "0.5", "--report", tmp_path / "r.json")
    assert fail.returncode == 1, fail.stderr
    assert fail.stderr.count("\n") == 1 and fail.stderr.startswith("dsgonnx: error: accuracy gate failed")
    assert json.loads((tmp_path / "r.json").read_text())["gate"]["passed"] is False

    ok = _process(tiny["fp"], tiny["crushed"], "--data", tiny["labelled"], "--max-drop", "90")
    assert ok.returncode == 0 and ok.stderr == "" and "top-1 accuracy" in ok.stdout

    bad_input = _process(tiny["fp"], tiny["root"] / "missing.onnx", "--data", tiny["labelled"])
    assert bad_input.returncode == 2
    assert bad_input.stderr.splitlines() == [f"dsgonnx: error: model file not found: {tiny['root'] / 'missing.onnx'}"]


def test_library_imports_neither_torch_nor_click():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['click'] = None\n"
        "import dsgonnx.validation, dsgonnx.validation.core, dsgonnx.preprocess, dsgonnx.hardware"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_console_script_is_installed(tiny):
    script = shutil.which("dsgonnx") or str(Path(sys.executable).parent / "dsgonnx")
    if not os.path.exists(script):
        pytest.skip("dsgonnx console script not installed")
    result = subprocess.run([script, "validate", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--max-drop" in result.stdout and "tf-lite" in result.stdout


# --- real models and images (../shared) ----------------------------------------------------------------------------


def _imagenet_subset(tmp_path: Path, every: int) -> tuple[Path, Path]:
    """One image of every ``every``-th ImageNet class, and the full class list that labels them."""
    all_classes = sorted(d for d in os.listdir(IMAGENET) if (IMAGENET / d).is_dir())
    (tmp_path / "classes.txt").write_text("\n".join(all_classes) + "\n")
    return _subset(tmp_path / "imgs", IMAGENET, all_classes[::every], per_class=1), tmp_path / "classes.txt"


def _subset(root: Path, source: Path, classes, per_class: int) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for file in sorted((source / name).iterdir())[:per_class]:
            os.symlink(file, root / name / file.name)
    return root


@pytest.mark.skipif(not (MODELS / "cifar10_resnet20.onnx").exists() or not CIFAR.is_dir(), reason="../shared not present")
def test_cifar10_resnet20_on_real_images(tmp_path):
    classes = sorted(os.listdir(CIFAR))
    data = _subset(tmp_path / "cifar", CIFAR, classes, per_class=10)
    model = MODELS / "cifar10_resnet20.onnx"
    result = run_cli(model, model, "--data", data, "--resize", "32", "--crop", "32", "--report", tmp_path / "r.json",
                     "--max-drop", "0", "--provider", "cpu")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fp32"]["top1"] >= 60  # README: 81% on the full set; labels and preprocessing are right
    assert report["agreement"] == 1.0 and report["drop_top1"] == 0 and report["sqnr_db"] is None


@pytest.mark.skipif(not (MODELS / "imagenet_squeezenet1.1_fp16_nobn.onnx").exists() or not IMAGENET.is_dir(),
                    reason="../shared not present")
def test_fp16_squeezenet_with_weights_as_inputs_and_softmax_output(tmp_path):
    data, classes = _imagenet_subset(tmp_path, every=125)
    model = MODELS / "imagenet_squeezenet1.1_fp16_nobn.onnx"
    result = run_cli(model, model, "--data", data, "--classes", classes, "--preprocess", "none",
                     "--resize", "256", "--channel-order", "bgr", "--mean", "104,117,123", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_kind"] == "probabilities" and report["batch_size"] == 1
    assert report["num_samples"] == 8 and report["num_classes"] == 1000 and report["fp32"]["top1"] >= 25


@pytest.mark.skipif(not (MODELS / "imagenet_mobilenet_v1_0.25.onnx").exists() or not IMAGENET.is_dir(),
                    reason="../shared not present")
def test_mobilenet_w8a8_on_imagenet_samples(tmp_path):
    """The acceptance path in small: real model, real W8A8 QDQ copy, real images, the gate."""
    from dsgonnx.hardware import needs_reduce_range
    from dsgonnx.preprocess import load_image, scan_image_folder

    data, classes = _imagenet_subset(tmp_path, every=20)  # 50 images
    recipe = preprocess_from_preset("inception").for_input_size(224)
    calibration = [load_image(f, recipe) for f in scan_image_folder(str(IMAGENET)).files[7::100]]  # 10 others
    fp, q = MODELS / "imagenet_mobilenet_v1_0.25.onnx", tmp_path / "w8a8.onnx"
    quantize_w8a8(fp, q, calibration, reduce_range=needs_reduce_range())
    common = [fp, q, "--data", data, "--classes", classes, "--preprocess", "inception"]
    loose = run_cli(*common, "--max-drop", "30", "--report", tmp_path / "r.json")
    assert loose.exit_code == 0, loose.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fp32"]["top1"] >= 40 and 0.5 <= report["agreement"] < 1 and report["sqnr_db"] > 5
    tight = run_cli(*common, "--max-drop", "30", "--min-agreement", "1")
    assert_one_line_error(tight, 1, "below --min-agreement 1")


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((reference - other).astype(np.float64) ** 2)))


def test_exact_scores_the_qdq_graph_as_written(tiny, tmp_path):
    """--exact: the quantized model without ORT's fused integer kernels (what a CPU whose int8
    kernels cannot saturate computes); the default runs it as ORT does on this machine."""
    from dsgonnx import QuantConfig, quantize

    images = tiny_images(n=64, seed=3)
    q = tmp_path / "q.onnx"
    quantize(str(tiny["fp"]), QuantConfig(calib=images, num_samples=64, reduce_range=False, output=str(q),
                                          validate=False))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(q), options, providers=["CPUExecutionProvider"])
    written = as_written.run(None, {as_written.get_inputs()[0].name: images})[0]
    fused, fp = ort_outputs(q, images), ort_outputs(tiny["fp"], images)
    assert not np.array_equal(written, fused)  # ORT's integer kernels round differently: the two runs differ

    exact = validate(tiny["fp"], q, ValidateConfig(exact=True), images=images).to_dict()
    native = validate(tiny["fp"], q, ValidateConfig(), images=images).to_dict()
    assert exact["arithmetic"] == "exact" and native["arithmetic"] == "native"
    assert exact["sqnr_db"] == pytest.approx(_sqnr(fp, written), rel=1e-4)
    assert native["sqnr_db"] == pytest.approx(_sqnr(fp, fused), rel=1e-4)


def test_cli_exact_says_so(tiny, tmp_path):
    from click.testing import CliRunner

    from dsgonnx_cli.main import cli

    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["validate", str(tiny["fp"]), str(tiny["crushed"]), "--data", str(tiny["labelled"]),
                                       "--exact", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "arithmetic        exact" in result.output and json.loads(report.read_text())["arithmetic"] == "exact"
