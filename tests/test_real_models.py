"""Real pretrained classifiers: the shared vendor-style ONNX files and EfficientNet-Lite0."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from dsgonnx.inspection import inspect_model
from dsgonnx_cli.main import cli

# file -> (BN layers, classes, opset, bn_folded), from ../shared/models/README.md
SHARED_MODELS = {
    "cifar10_resnet20.onnx": (19, 10, 13, False),
    "cifar10_resnet56.onnx": (55, 10, 13, False),
    "imagenet_mobilenet_v1_0.25.onnx": (27, 1000, 13, False),
    "imagenet_mobilenet_v1_0.75.onnx": (27, 1000, 13, False),
    # fp16, opset 7, weights also listed as graph inputs, no BN (Conv + bias)
    "imagenet_squeezenet1.1_fp16_nobn.onnx": (0, 1000, 7, True),
}


@pytest.mark.parametrize("name", sorted(SHARED_MODELS))
def test_shared_model_inspects_with_parity(shared, name):
    bn, classes, opset, folded = SHARED_MODELS[name]
    info = inspect_model(shared / "models" / name)
    assert info["bn_count"] == bn
    assert info["num_classes"] == classes
    assert info["opset"] == opset
    assert info["bn_folded"] is folded
    # far inside the tolerance check_parity raises at (1.3e-3 to 5e-2 here): measured 3e-6 to 5.5e-5
    assert info["torch_parity"]["max_abs_diff"] < 2e-4
    assert info["torch_parity"]["top1_agreement"] == 1.0


def test_cifar_resnet_dynamic_pad_shortcut_is_converted(shared):
    """The option-A shortcut is a Shape/Gather/ConstantOfShape/Pad subgraph; parity above
    proves it converts, this pins that the subgraph is really there."""
    info = inspect_model(shared / "models" / "cifar10_resnet20.onnx")
    assert info["op_histogram"]["Pad"] == 2 and info["op_histogram"]["ConstantOfShape"] == 2


def test_efficientnet_lite0_bn_kept(efficientnet):
    result = CliRunner().invoke(cli, ["inspect", str(efficientnet["bn"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["bn_count"] == 49 and info["num_classes"] == 1000 and not info["bn_folded"]
    assert all(layer["channels"] > 0 for layer in info["bn_layers"])
    assert info["torch_parity"]["top1_agreement"] == 1.0


def test_efficientnet_lite0_folded(efficientnet):
    info = inspect_model(efficientnet["folded"])
    assert info["bn_count"] == 0 and info["bn_folded"] is True
    assert info["torch_parity"]["top1_agreement"] == 1.0


SQUEEZENET_PREPROCESS = ["--preprocess", "none", "--mean", "104,117,123", "--std", "1", "--channel-order", "bgr",
                         "--pixel-scale", "255"]  # ../shared/models/README.md: BGR 0-255 minus (104, 117, 123)


def test_a_float16_opset_7_model_is_quantized_with_its_interface_kept(shared, tmp_path):
    """The vendor-style SqueezeNet (float16, opset 7, IR 3, weights listed as inputs, batch fixed
    to 1, 4-D softmax output) is quantized through a float32 opset-13 twin: the file written takes
    and gives float16 with the same names and shapes, and follows the original on real photos;
    reconstruction (whose torch twin runs batches of other sizes) and analyze take it too."""
    import numpy as np
    import onnxruntime as ort

    from dsgonnx import QuantConfig, analyze
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.preprocess import preprocess_from_preset
    from dsgonnx.validation.data import open_dataset

    model = shared / "models" / "imagenet_squeezenet1.1_fp16_nobn.onnx"
    out = tmp_path / "sq.w8a8.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(model), "--calib", "procedural", "--num-samples", "16",
                                      "--no-validate", "-o", str(out), *SQUEEZENET_PREPROCESS])
    assert result.exit_code == 0, result.output
    assert "is worked on as float32" in result.stderr and "opset 13 (converted from 7" in result.stderr
    written, original = onnx.load(str(out)), onnx.load(str(model))
    image_input = next(value for value in original.graph.input if value.name == "data_0")  # (the weights are inputs too)
    assert [value.name for value in written.graph.input] == ["data_0"]
    for ours, theirs in ((written.graph.input[0], image_input), (written.graph.output[0], original.graph.output[0])):
        assert (ours.name, ours.type.tensor_type.elem_type) == (theirs.name, onnx.TensorProto.FLOAT16)
        assert [d.dim_value for d in ours.type.tensor_type.shape.dim] == [d.dim_value for d in theirs.type.tensor_type.shape.dim]
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)
    recipe = preprocess_from_preset("none", mean=(104, 117, 123), std=(1, 1, 1), channel_order="BGR")  # the flags'
    images = open_dataset(load_model(model).input, str(shared / "datasets" / "imagenet-samples"),
                          recipe).batch(0, 24).astype(np.float16)
    runs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (model, out)]
    fp, q = ([s.run(None, {"data_0": image[None]})[0].reshape(-1) for image in images] for s in runs)
    fp, q = np.stack(fp).astype(np.float64), np.stack(q).astype(np.float64)
    agreement = np.mean(fp.argmax(1) == q.argmax(1))
    assert agreement >= 0.75, agreement  # measured 0.913 on all 1000 images, SQNR 19.2 dB (probabilities)
    refined = tmp_path / "sq.w6a6.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(model), "--w6a6", "--calib", "procedural", "--num-samples", "8",
                                      "--refine", "brecq", "--refine-iters", "2", "--no-validate",
                                      # the fallback weighs its candidates on the calibration images alone:
                                      # the 32 inversion images it would synthesize as probes took 17 s here
                                      "--fallback-probes", "none", "-o", str(refined),
                                      "--quiet", *SQUEEZENET_PREPROCESS])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["decisions"]["input_batch"].startswith("1, as the file fixes it")
    report = analyze(str(model), QuantConfig(preprocess=recipe), quantized=str(out),
                     data=str(shared / "datasets" / "imagenet-samples"), eval_samples=8)
    assert report.full["agreement"] >= 0.6 and report.tensors, report.full


def test_quantize_real_cifar_model_with_real_calibration(shared, tmp_path):
    """ResNet-20, 20 real calibration images, W8A8, validated on 200 other test images."""
    data = shared / "datasets" / "cifar10-test"
    out = tmp_path / "r20.onnx"
    result = CliRunner().invoke(cli, [
        "quantize", str(shared / "models" / "cifar10_resnet20.onnx"), "-o", str(out), "--calib", str(data),
        "--num-samples", "20", "--preprocess", "imagenet", "--resize", "32", "--crop", "32", "--no-validate",
        "--quiet"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "val"
    for label in sorted(p.name for p in data.iterdir())[:10]:
        (folder / label).mkdir(parents=True)
        for image in sorted((data / label).iterdir())[1:21]:
            (folder / label / image.name).symlink_to(image)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["validate", str(shared / "models" / "cifar10_resnet20.onnx"), str(out),
                                      "--data", str(folder), "--resize", "32", "--crop", "32",
                                      "--max-drop", "5", "--report", str(report)])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["num_samples"] == 200 and figures["fp32"]["top1"] > 60
    assert figures["drop_top1"] <= 5 and figures["agreement"] > 0.9


def test_calibration_images_preprocessed_unlike_training_are_said_with_the_figures(shared, tmp_path):
    """The same 16 CIFAR-10 images, normalised as the model was trained and left at 0-255 (no
    mean/std): the first BN layer's statistics tell the two apart by four orders of magnitude
    (0.05 against 7,166 measured), and quantize says so for the second, naming the preprocessing."""
    model = shared / "models" / "cifar10_resnet20.onnx"
    common = ["quantize", str(model), "--calib", str(shared / "datasets" / "cifar10-test"), "--num-samples", "16",
              "--resize", "32", "--crop", "32", "--no-validate"]
    records = {}
    for preset in ("imagenet", "none"):
        out = tmp_path / f"{preset}.onnx"
        result = CliRunner().invoke(cli, common + ["--preprocess", preset, "-o", str(out)])
        assert result.exit_code == 0 and out.exists(), result.output
        records[preset] = (json.loads(result.stdout)["calibration"]["first_bn"], result.stderr)
    (right, said), (raw, warned) = records["imagenet"], records["none"]
    assert right["layer"] == raw["layer"] == "/bn1/BatchNormalization"
    assert right["gap"] < 1 and not right["far"] and "far from what the model was trained on" not in said
    assert raw["gap"] > 1000 and raw["far"], raw
    assert f"their mean and std are {raw['gap'] ** 0.5:.0f} running std off" in warned, warned
    assert "Check --preprocess (mean, std, pixel scale, channel order)" in warned
    # drawn images (noise, dead leaves) are not measured: they are unlike any training image
    result = CliRunner().invoke(cli, ["quantize", str(model), "--calib", "gaussian", "--num-samples", "16",
                                      "--no-validate", "-o", str(tmp_path / "noise.onnx")])
    assert result.exit_code == 0 and "first_bn" not in json.loads(result.stdout)["calibration"], result.output


def test_a_ready_made_calibration_set_outside_the_given_preprocessing_is_said(shared, tmp_path):
    """16 CIFAR-10 photos saved as an .npz twice: normalised with ImageNet's mean/std, as
    `--preprocess imagenet` says, and left at 0-255. Quantize measures the share of values
    outside the box photos occupy under the preprocessing given, and says so for the second."""
    from PIL import Image

    folder = shared / "datasets" / "cifar10-test"
    files = sorted(p for label in sorted(folder.iterdir()) for p in sorted(label.iterdir())[:2])[:16]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) for f in files]).transpose(0, 3, 1, 2)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    sets = {"normalised": (pixels / 255 - mean) / std, "raw": pixels}
    model = shared / "models" / "cifar10_resnet20.onnx"
    records = {}
    for name, images in sets.items():
        np.savez(tmp_path / f"{name}.npz", images=images)
        result = CliRunner().invoke(cli, ["quantize", str(model), "--calib", str(tmp_path / f"{name}.npz"),
                                          "--preprocess", "imagenet", "--resize", "32", "--crop", "32",
                                          "--no-validate", "-o", str(tmp_path / f"{name}.onnx")])
        assert result.exit_code == 0, result.output
        records[name] = (json.loads(result.stdout)["calibration"], result.stderr)
    (right, said), (raw, warned) = records["normalised"], records["raw"]
    assert right["outside_pixel_box"] == 0 and "lie outside the box" not in said
    # ImageNet's box tops out at 2.64: every raw pixel above 2.8 or so is outside
    expected = float(np.mean(pixels > 2.8))
    assert raw["outside_pixel_box"] == pytest.approx(expected, abs=0.02), raw
    assert f"{raw['outside_pixel_box']:.0%} of the values in {tmp_path / 'raw.npz'} lie outside the box" in warned
    assert "Check the set was made for this --preprocess" in warned
    # an image folder is preprocessed by the run itself, and nothing is measured without a preprocessing
    for calib, extra in ((str(folder), ["--preprocess", "imagenet"]), (str(tmp_path / "raw.npz"), [])):
        result = CliRunner().invoke(cli, ["quantize", str(model), "--calib", calib, "--num-samples", "16", *extra,
                                          "--no-validate", "-o", str(tmp_path / "other.onnx"), "--force"])
        assert result.exit_code == 0, result.output
        assert "outside_pixel_box" not in json.loads(result.stdout)["calibration"]


def test_a_model_onnx_runtime_fails_to_run_is_bad_input_not_an_internal_error(shared, tmp_path):
    """Found by mutation fuzzing: ResNet-20 whose shortcut Pad takes a tensor as its constant
    value loads, passes the checker and shape inference, and fails only when ORT runs it."""
    model = onnx.load(str(shared / "models" / "cifar10_resnet20.onnx"))
    pad = next(n for n in model.graph.node if n.name == "/layer3/layer3.0/Pad")
    pad.input[2] = "/layer2/layer2.1/Add_output_0"
    path = tmp_path / "pad_value_tensor.onnx"
    onnx.save(model, str(path))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dsgonnx: error: ONNX Runtime cannot run {path}"), lines[0]


def test_calibration_files_are_left_out_of_val_data_scoring(shared, tmp_path):
    """quantize --calib DIR --val-data DIR: the 10 images calibrated on are not scored; the
    other 20 are."""
    data = shared / "datasets" / "cifar10-test"
    folder = tmp_path / "images"
    for label in sorted(p.name for p in data.iterdir())[:10]:
        (folder / label).mkdir(parents=True)
        for image in sorted((data / label).iterdir())[:3]:
            (folder / label / image.name).symlink_to(image)
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, [
        "quantize", str(shared / "models" / "cifar10_resnet20.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib",
        str(folder), "--num-samples", "10", "--val-data", str(folder), "--resize", "32", "--crop", "32",
        "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert json.loads(report.read_text())["num_samples"] == 20 and summary["calibration"]["num_samples"] == 10


def test_the_readme_main_job_cut_down(efficientnet, tmp_path):
    """The README's main job — `dsgonnx quantize models/efficientnet_lite0.onnx --w8a8
    --preprocess tf-lite` — with 4 DSG samples, 4 held out and 2 iterations instead of the
    CPU defaults (64 + 16, 100): the whole path runs and says what it did."""
    out = tmp_path / "efficientnet_lite0.w8a8.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(efficientnet["bn"]), "--w8a8", "--preprocess", "tf-lite",
                                      "--num-samples", "4", "--holdout", "4", "--iters", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and out.exists()
    assert summary["calibration"]["method"] == "dsg" and summary["calibration"]["iters"] == 2
    decisions = summary["decisions"]
    assert decisions["bias_correction"]["means"]["input_mean"] == "first BN"  # solved from the stem's BN
    assert decisions["pool_range"]["tensors"]  # the pooled features on their input's range
    validation = summary["validation"]  # on the 4 held-out synthetic samples: unlabelled, agreement only
    assert validation["fp32"]["top1"] is None and validation["agreement"] >= 0.5, validation
