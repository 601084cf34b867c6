"""Models that take 8-bit pixels and normalise them themselves (a Cast to float first).

dsgonnx works on a twin that takes the same pixels as float32, synthesizes on the scale of
normalised images and hands back whole pixels, and writes the quantized model with the
file's uint8 input (a Cast in front): every command takes such a model as it is.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper
from PIL import Image

from dsgonnx import QuantConfig, analyze, inspect, quantize, synthesize
from dsgonnx.errors import InputSpecError
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.validation.metrics import sqnr_db
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet, export_tiny_uint8, make_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uint8")
    return {"folder": folder, "nchw": export_tiny_uint8(folder / "pixels.onnx"),
            "nhwc": export_tiny_uint8(folder / "pixels_nhwc.onnx", nhwc=True)}


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _pixels(count, shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape)).astype(np.uint8)


def test_a_uint8_model_is_worked_on_through_an_exact_float_twin(models):
    loaded = load_model(models["nchw"])
    assert loaded.takes_pixels and loaded.input.dtype == np.float32 and loaded.file_dtype == np.uint8
    pixels = _pixels(4, (3, 16, 16))
    # the twin takes the same whole pixels as float32 and computes what the file does
    np.testing.assert_allclose(_run(loaded.path, pixels.astype(np.float32)), _run(models["nchw"], pixels), atol=1e-5)
    # images for the file are rounded and clipped into uint8
    given = np.array([[[[-3.0, 0.4]], [[0.6, 254.5]], [[255.7, 300.0]]]], np.float32)
    assert loaded.in_file_layout(given).dtype == np.uint8
    assert loaded.in_file_layout(given).ravel().tolist() == [0, 0, 1, 254, 255, 255]
    info = inspect(models["nhwc"])
    assert info["input"]["dtype"] == "uint8" and info["input"]["layout"] == "NHWC"
    assert info["torch_parity"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_quantize_writes_the_uint8_input_back_and_follows_the_file(models, layout):
    output = models["folder"] / f"q_{layout}.onnx"
    result = quantize(str(models[layout]), QuantConfig(wbits=8, abits=8, num_samples=32, iters=30, holdout=16,
                                                       output=str(output), force=True))
    written = onnx.load(str(output))
    assert written.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert written.graph.node[0].op_type == "Cast"
    assert result.decisions["input_type"].startswith("uint8")
    shape = (3, 16, 16) if layout == "nchw" else (16, 16, 3)
    pixels = _pixels(64, shape, seed=1)
    # the quantized model runs on the file's pixels and follows the float file on them
    assert sqnr_db(_run(models[layout], pixels), _run(output, pixels)) > 20


def test_synthesized_images_are_whole_pixels_spread_over_their_range(models):
    images = synthesize(str(models["nchw"]), num_samples=8, iters=30, seed=0).images
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 255
    assert np.array_equal(images, np.rint(images))
    # optimised on the scale of normalised images: on raw pixels 30 steps of 0.1 from noise
    # clipped at 0 would leave them within a few levels of black
    assert images.std() > 20 and images.mean() > 20


def _photos(root):
    """Ten labelled 20×20 images, one per class folder (smooth: resized 4×4 noise)."""
    for label in range(10):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        pixels = np.random.default_rng(label).integers(0, 256, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(pixels).resize((20, 20), Image.BILINEAR).save(folder / "0.png")
    return root


def test_validate_takes_the_pixels_as_they_are_and_refuses_a_normalising_recipe(models, tmp_path):
    _photos(tmp_path / "data")
    quantized = models["folder"] / "q_nchw.onnx"
    if not quantized.exists():
        quantize(str(models["nchw"]), QuantConfig(num_samples=16, iters=10, output=str(quantized), force=True))
    args = ["validate", str(models["nchw"]), str(quantized), "--data", str(tmp_path / "data")]
    result = CliRunner().invoke(cli, args + ["--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["data"]["preprocess"]["pixel_scale"] == 255 and report["data"]["preprocess"]["mean"] == [0, 0, 0]
    assert report["agreement"] >= 0.8 and report["num_samples"] == 10
    refused = CliRunner().invoke(cli, args + ["--preprocess", "imagenet"])
    assert refused.exit_code == 2 and "uint8" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_a_model_that_reads_its_pixels_as_integers_is_refused(tmp_path):
    """Integer arithmetic before the Cast (a shift: halved pixels, rounded down) cannot be done
    on float pixels."""
    weight = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = make_model(
        [helper.make_node("BitShift", ["pixels", "one"], ["shifted"], direction="RIGHT"),
         helper.make_node("Cast", ["shifted"], ["floats"], to=TensorProto.FLOAT),
         helper.make_node("Conv", ["floats", "w"], ["conv"]),
         helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["scores"])],
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4])],
        [("one", np.array(1, np.uint8)), ("w", weight)])
    path = tmp_path / "integers.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputSpecError, match="uint8"):
        load_model(path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_uint8_arrays_calibrate_and_validate_a_uint8_model_only(models, tmp_path):
    """An .npz of uint8 pixels is what such a model takes: quantize calibrates on it and
    validate scores on it; a float model still refuses one (its images are preprocessed floats)."""
    pixels = np.random.default_rng(3).integers(0, 256, (40, 3, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "pixels.npz", images=pixels, labels=np.arange(40) % 10)
    output = tmp_path / "q.onnx"
    result = quantize(str(models["nchw"]), QuantConfig(calib=str(tmp_path / "pixels.npz"), num_samples=24, holdout=16,
                                                       output=str(output), force=True))
    assert result.calibration["method"] == "real" and result.report.to_dict()["num_samples"] == 16
    args = ["validate", str(models["nchw"]), str(output), "--data", str(tmp_path / "pixels.npz")]
    scored = CliRunner().invoke(cli, args + ["--report", str(tmp_path / "r.json")])
    assert scored.exit_code == 0, scored.output
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 40
    float_model = export_tiny_resnet(tmp_path / "float.onnx")
    refused = CliRunner().invoke(cli, ["validate", str(float_model), str(float_model), "--data", str(tmp_path / "pixels.npz")])
    assert refused.exit_code == 2 and "floating point" in refused.output and "Traceback" not in refused.output


def test_analyze_measures_on_uint8_arrays(models, tmp_path):
    """analyze --data takes what validate takes for such a model: an .npz of uint8 arrays."""
    pixels = np.random.default_rng(4).integers(0, 256, (12, 3, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "pixels.npz", images=pixels, labels=np.arange(12) % 10)
    quantized = models["folder"] / "q_nchw.onnx"
    if not quantized.exists():
        quantize(str(models["nchw"]), QuantConfig(num_samples=16, iters=10, output=str(quantized), force=True))
    analysis = analyze(str(models["nchw"]), data=str(tmp_path / "pixels.npz"), quantized=str(quantized))
    assert analysis.samples["count"] == 12 and analysis.samples["labelled"] and "top1" in analysis.fp32
    assert analysis.tensors and analysis.full["agreement"] >= 0.5


def test_qat_generator_works_on_the_unit_scale_and_hands_the_student_pixels(models):
    """QAT's generator (--qat-data generator) trains against the unit-pixel twin, as synthesis
    does (its slack margins are measured on a Gaussian batch on the scale of normalised images,
    not on near-black pixels 0-3), and hands the student the pixels the file takes."""
    from dsgonnx.config import QatConfig
    from dsgonnx.graph.onnx_io import unit_pixel_twin
    from dsgonnx.graph.to_torch import to_torch
    from dsgonnx.pipeline import _qat_generator
    from dsgonnx.synth.generative import GeneratorTrainer

    loaded = load_model(models["nchw"])
    config = QuantConfig(wbits=4, abits=4, qat=QatConfig(data="generator"))
    source = _qat_generator(loaded, config, {"method": "dsg"})
    assert source.unit_pixels and source.describe()["unit_pixels"]
    cpu = torch.device("cpu")
    trainer = source.trainer(10, 8, cpu, lr=1e-3, bn_weight=0.1, seed=0)
    ones = torch.ones(1, 3, 1, 1)
    unit = GeneratorTrainer(to_torch(unit_pixel_twin(loaded)), 10, 8, cpu, box=(-ones, ones), seed=0,
                            epsilon=source.epsilon, slack_reading=source.slack_reading)
    for margin, expected in zip(trainer.margins, unit.margins):
        torch.testing.assert_close(margin.mean, expected.mean)
        torch.testing.assert_close(margin.std, expected.std)
    images, scores = trainer.step(train=False)
    units, _ = unit.step(train=False)
    torch.testing.assert_close(images, units * 127.5 + 127.5)
    assert images.min() >= 0 and images.max() <= 255
    # the teacher's logits are the file's on the pixels handed out
    np.testing.assert_allclose(scores.numpy(), _run(loaded.path, images.numpy()), atol=1e-3, rtol=1e-3)


def test_float_arrays_for_a_uint8_model_must_hold_pixels(models, tmp_path):
    """Float arrays given to such a model are pixels 0-255: images scaled to 0-1 (which would
    round to black) or normalised for a float model are refused in one line, by quantize's
    calibration as by validate, and nothing is written; whole pixels as floats are taken."""
    pixels = np.random.default_rng(5).integers(0, 256, (24, 3, 16, 16)).astype(np.float32)
    labels = np.arange(24) % 10
    np.savez(tmp_path / "scaled.npz", images=pixels / 255, labels=labels)
    np.savez(tmp_path / "normalised.npz", images=(pixels / 255 - 0.45) / 0.225, labels=labels)
    np.savez(tmp_path / "pixels.npz", images=pixels, labels=labels)
    quantized = models["folder"] / "q_nchw.onnx"
    if not quantized.exists():
        quantize(str(models["nchw"]), QuantConfig(num_samples=16, iters=10, output=str(quantized), force=True))
    output = tmp_path / "q.onnx"
    for name, words in (("scaled", "scaled to 0-1"), ("normalised", "preprocessed for a float model")):
        data = str(tmp_path / f"{name}.npz")
        for args in (["validate", str(models["nchw"]), str(quantized), "--data", data],
                     ["quantize", str(models["nchw"]), "--calib", data, "-o", str(output)]):
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 2 and words in result.output, (args[0], name, result.output)
            errors = [line for line in result.output.splitlines() if "error" in line]
            assert "Traceback" not in result.output and len(errors) == 1 and words in errors[0]
    assert not output.exists()
    scored = CliRunner().invoke(cli, ["validate", str(models["nchw"]), str(quantized), "--data",
                                      str(tmp_path / "pixels.npz")])
    assert scored.exit_code == 0, scored.output
