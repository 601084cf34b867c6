"""Bias correction: the expected output shift of quantized weights is removed, from BN
statistics (analytic) or calibration means (empirical), in the QDQ model ORT wrote."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import dsgonnx
from dsgonnx import DataError, QuantConfig
from dsgonnx.quant.correct import bn_moments, clipped_mean
from dsgonnx_cli.main import cli
from zoo import SHARED, export_torchscript


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("correct")
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
    held = rng.standard_normal((256, 3, 16, 16)).astype(np.float32)
    return {"folder": folder, "model": export_torchscript(folder / "tiny.onnx", keep_bn=True), "calib": calib,
            "held": held}


def _logits(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def _quantize(setup, name, **settings):
    # nearest rounding: the bias correction of plain rounding is tested (SQuant's, 3 bits' default,
    # moves the integers and is checked against nearest rounding with and without correction)
    settings = {"wbits": 3, "abits": 8, "calib": setup["calib"], "num_samples": 32, "validate": False,
                "logits": "float", "rounding": "nearest", **settings}
    return dsgonnx.quantize(setup["model"], QuantConfig(output=str(setup["folder"] / name), force=True, **settings))


def test_clipped_normal_mean_matches_sampling():
    rng = np.random.default_rng(0)
    mu, sigma = np.array([-1.0, 0.0, 0.5, 3.0, 7.0]), np.array([0.5, 1.0, 2.0, 1.5, 0.2])
    z = rng.normal(mu, sigma, size=(400_000, 5))
    np.testing.assert_allclose(clipped_mean(mu, sigma, None), np.maximum(z, 0).mean(0), atol=0.01)
    np.testing.assert_allclose(clipped_mean(mu, sigma, 6.0), np.clip(z, 0, 6).mean(0), atol=0.01)


@pytest.mark.parametrize("mode", ["empirical", "auto"])
def test_correction_removes_the_systematic_output_error(setup, mode):
    """At 3-bit weights the quantized logits are offset from the float ones on average;
    correcting the biases must shrink that offset (its norm over classes) by half or more.
    (``analytic`` alone is not asked to here: it predicts the means of the data the BN
    statistics describe, not of these noise images; the MobileNet test below measures it.)"""
    fp = _logits(setup["model"], setup["held"])
    plain = _quantize(setup, "off.onnx", bias_correction="off")
    fixed = _quantize(setup, f"{mode}.onnx", bias_correction=mode)
    offset_plain = np.linalg.norm((_logits(plain.output, setup["held"]) - fp).mean(0))
    offset_fixed = np.linalg.norm((_logits(fixed.output, setup["held"]) - fp).mean(0))
    assert offset_fixed < 0.5 * offset_plain, (offset_plain, offset_fixed)


@pytest.mark.parametrize("mode", ["empirical", "analytic", "auto"])
def test_each_layer_takes_its_mean_from_the_source_the_mode_names(setup, mode):
    fixed = _quantize(setup, f"src-{mode}.onnx", bias_correction=mode)
    report = fixed.decisions["bias_correction"]
    sources = report["means"]
    # two convs and the classifier's weights (its logits stay float); only the second conv
    # reads ReLU(BN(.)) directly, which has a closed-form mean; the others read the image and
    # pooled features
    assert report["mode"] == mode and report["layers"] == 3 - sources["uncorrected"]
    # (the random first layer's BN equations disagree: the input's mean is not solved from it)
    images, none = "calibration images", None
    assert sources == {"empirical": {"analytic": 0, "empirical": 3, "uncorrected": 0, "input_mean": images},
                       "analytic": {"analytic": 1, "empirical": 0, "uncorrected": 2, "input_mean": none},
                       "auto": {"analytic": 1, "empirical": 2, "uncorrected": 0, "input_mean": images}}[mode]
    meta = {p.key: p.value for p in onnx.load(str(fixed.output)).metadata_props}
    assert json.loads(meta["dsgonnx.decisions"])["bias_correction"]["mode"] == mode


def test_only_biases_change_and_they_stay_int32_on_their_scale(setup):
    plain = onnx.load(str(_quantize(setup, "plain.onnx", bias_correction="off").output))
    fixed = onnx.load(str(_quantize(setup, "fixed.onnx", bias_correction="empirical").output))
    before = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    assert before.keys() == after.keys()
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert changed and all(name.endswith("bias_quantized") for name in changed), changed
    assert all(after[name].dtype == np.int32 for name in changed)


def test_analytic_moments_come_from_the_unfolded_bn(setup):
    model = onnx.load(str(setup["model"]))
    moments = bn_moments(model)
    assert len(moments) == 2
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            beta = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[2]))
            np.testing.assert_array_equal(moments[node.output[0]][0], beta)


def test_cli_switch_and_bad_value(setup):
    out = setup["folder"] / "cli.onnx"
    np.savez(setup["folder"] / "calib.npz", images=setup["calib"])
    args = ["quantize", str(setup["model"]), "--wbits", "3", "--abits", "8", "--calib", str(setup["folder"] / "calib.npz"),
            "--num-samples", "32", "-o", str(out), "--force", "--no-validate", "--quiet"]
    result = CliRunner().invoke(cli, args + ["--bias-correction", "off"])
    assert result.exit_code == 0, result.stderr
    assert "bias_correction" not in json.loads(result.stdout)["decisions"]
    result = CliRunner().invoke(cli, args)
    assert json.loads(result.stdout)["decisions"]["bias_correction"]["mode"] == "auto"
    result = CliRunner().invoke(cli, args + ["--bias-correction", "sometimes"])
    assert result.exit_code == 2 and "sometimes" in result.stderr
    with pytest.raises(DataError, match="unknown `bias_correction`"):
        QuantConfig(bias_correction="sometimes")


def _shared_mobilenet(width: str):
    """(model, image folder path, its scan, a loader of files as preprocessed images) for an
    ImageNet MobileNet v1 in ../shared; skips when it is absent."""
    model = SHARED / "models" / f"imagenet_mobilenet_v1_{width}.onnx"
    data = SHARED / "datasets" / "imagenet-samples"
    if not model.exists() or not data.is_dir():
        pytest.skip(f"needs ../shared (MobileNet v1 {width} and imagenet-samples)")
    from dsgonnx.preprocess import load_image, scan_image_folder

    recipe = dsgonnx.PRESETS["inception"].for_input_size(224)
    return model, data, scan_image_folder(str(data)), lambda files: np.stack([load_image(f, recipe) for f in files])


def test_mobilenet_w6a6_recovers_with_analytic_correction(tmp_path):
    """The depthwise network that loses most to the output shift: MobileNet v1 0.25 at W6A6,
    100 real calibration images, scored on 200 others (benchmark: 24.3 % -> 50.9 % on 900)."""
    model, data, folder, load = _shared_mobilenet("0.25")
    from dsgonnx.calibration_data import spread_indices

    calib = set(spread_indices(len(folder.files), 100).tolist())
    held = [i for i in range(len(folder.files)) if i not in calib][::4][:200]
    images = load([folder.files[i] for i in held])
    labels = np.array([folder.labels[i] for i in held])
    np.savez(tmp_path / "held.npz", images=images, labels=labels)
    top1 = {}
    for mode in ("off", "analytic"):
        result = dsgonnx.quantize(model, QuantConfig(
            wbits=6, abits=6, calib=str(data), num_samples=100, preprocess=dsgonnx.PRESETS["inception"],
            bias_correction=mode, val_data=str(tmp_path / "held.npz"), output=str(tmp_path / f"{mode}.onnx")))
        top1[mode] = result.report.metrics.q_top1
    fp32 = result.report.metrics.fp_top1
    assert top1["analytic"] > top1["off"] + 15 and top1["analytic"] > fp32 - 15, (fp32, top1)


def test_the_first_bn_gives_the_input_mean_of_real_images(tmp_path):
    """MobileNet v1's first BN knows the mean of the images it was trained on: solved from its
    running mean, E[x] per channel is within 0.05 of 200 real ImageNet images' (DSG samples
    are 0.1 off), and analytic correction then covers the first layer too."""
    from dsgonnx.quant.correct import input_mean_from_bn
    from dsgonnx.quant.qdq import pre_process

    model, _, folder, load = _shared_mobilenet("0.75")
    real = load(folder.files[::5][:200]).mean(axis=(0, 2, 3))
    prepared = onnx.load(str(pre_process(model, tmp_path / "prepared.onnx")))
    estimate = input_mean_from_bn(prepared, bn_moments(onnx.load(str(model))))
    assert estimate is not None and np.abs(estimate - real).max() < 0.05, (estimate, real)
    assert input_mean_from_bn(prepared, {}) is None  # no BN statistics, no estimate
    images = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    for mode in ("analytic", "auto", "empirical"):
        result = dsgonnx.quantize(model, QuantConfig(calib=images, num_samples=8, validate=False, bias_correction=mode,
                                                     output=str(tmp_path / f"{mode}.onnx")))
        sources = result.decisions["bias_correction"]["means"]
        # analytic and auto reach every layer of MobileNet v1 without data, the first one too
        layers = result.decisions["bias_correction"]["layers"]
        assert layers == 27 and sources["uncorrected"] == 0, sources  # 27 Convs (the logits stay float)
        assert sources["empirical"] == (0 if mode != "empirical" else layers), sources
        assert sources["input_mean"] == ("first BN" if mode != "empirical" else "calibration images"), sources
