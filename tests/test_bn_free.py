"""Models without BN statistics (BN folded into Conv, or never there) are quantized data-free by
default: ``auto`` picks a BN-free source (procedural dead-leaves images), ``inversion`` optimises
from them without BN targets, and only an explicit ``dsg``/``zeroq`` is refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from dsgonnx import QuantConfig, SynthConfig, quantize, synthesize
from dsgonnx.inspection import inspect_model
from dsgonnx.preprocess import PRESETS, preprocess_from_preset
from dsgonnx.synth.procedural import procedural_images
from dsgonnx_cli.main import cli
from zoo import export_torchscript

ROOT = Path(__file__).resolve().parents[1]
CIFAR = preprocess_from_preset("imagenet", resize=32, crop=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bnfree")
    return {"kept": export_torchscript(folder / "kept.onnx", keep_bn=True),
            "folded": export_torchscript(folder / "folded.onnx", keep_bn=False), "folder": folder}


@pytest.fixture(scope="module")
def folded_resnet20(shared, tmp_path_factory):
    """ResNet-20 folded by models/fold_bn.py (ORT's basic optimiser), beside the BN-kept file."""
    spec = importlib.util.spec_from_file_location("fold_bn", ROOT / "models" / "fold_bn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept = shared / "models" / "cifar10_resnet20.onnx"
    path = tmp_path_factory.mktemp("folded") / "resnet20.folded.onnx"
    model = module.fold(str(kept), str(path))
    path.write_bytes(model.SerializeToString())
    return {"kept": kept, "folded": path, "data": shared / "datasets" / "cifar10-test", "fold_bn": module}


def _log_spectrum_slope(images: np.ndarray) -> float:
    """Slope of log radial power against log frequency over the mid band, averaged over images
    and channels: about -2 for natural images, 0 for white noise."""
    size = images.shape[-1]
    power = np.abs(np.fft.fft2(images - images.mean(axis=(2, 3), keepdims=True))) ** 2
    power = power.mean(axis=(0, 1))
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    radius = np.sqrt(fx**2 + fy**2)
    band = (radius > 2.0 / size) & (radius < 0.25)
    return float(np.polyfit(np.log(radius[band]), np.log(power[band]), 1)[0])


def test_procedural_set_made_in_parts_equals_the_set_made_at_once():
    whole = procedural_images(6, (3, 24, 24), seed=5, preprocess=PRESETS["imagenet"])
    parts = np.concatenate([procedural_images(2, (3, 24, 24), seed=5, preprocess=PRESETS["imagenet"], first=i)
                            for i in (0, 2, 4)])
    np.testing.assert_array_equal(whole, parts)
    assert not np.allclose(whole, procedural_images(6, (3, 24, 24), seed=6, preprocess=PRESETS["imagenet"]))


def test_procedural_images_fill_the_pixel_box_with_natural_statistics():
    recipe = PRESETS["imagenet"]
    images = procedural_images(32, (3, 64, 64), seed=0, preprocess=recipe)
    pixels = recipe.denormalise(images)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert pixels.max() - pixels.min() > 200  # the whole 8-bit range is used, not a grey middle
    slope = _log_spectrum_slope(pixels)
    noise_slope = _log_spectrum_slope(np.random.default_rng(0).standard_normal(pixels.shape))
    assert -3.5 < slope < -1.5, slope  # natural images: about -2 (scale invariance)
    assert abs(noise_slope) < 0.3, noise_slope  # the estimator tells noise apart
    contrast = pixels.std(axis=(1, 2, 3))
    assert contrast.max() > 1.5 * contrast.min()  # each image draws its own statistics
    unscaled = procedural_images(32, (3, 64, 64), seed=0)
    assert abs(float(unscaled.mean())) < 0.3 and 0.5 < float(unscaled.std()) < 1.5  # about N(0,1)'s scale


def test_auto_synthesizes_dsg_with_bn_statistics_and_procedural_without(tiny):
    kept = synthesize(str(tiny["kept"]), SynthConfig(num_samples=4, iters=2))
    folded = synthesize(str(tiny["folded"]), SynthConfig(num_samples=4, iters=2))
    assert kept.meta["method"] == "dsg" and "carries BN statistics" in kept.meta["method_choice"]
    assert folded.meta["method"] == "procedural" and "no BN statistics" in folded.meta["method_choice"]
    np.testing.assert_array_equal(folded.images, procedural_images(4, (3, 16, 16), seed=0))
    assert folded.meta["config"]["iters"] == 0  # drawn, not optimised
    explicit = synthesize(str(tiny["folded"]), SynthConfig(method="procedural", num_samples=4))
    assert explicit.meta["method_choice"] is None


def test_inversion_starts_from_procedural_images_and_draws_the_target_classes(folded_resnet20):
    path = str(folded_resnet20["folded"])
    settings = dict(method="inversion", num_samples=16, preprocess=CIFAR, device="cpu", seed=1)
    start = synthesize(path, SynthConfig(iters=0, **settings), holdout=0)
    np.testing.assert_array_equal(start.images, procedural_images(16, (3, 32, 32), seed=1, preprocess=CIFAR))
    end = synthesize(path, SynthConfig(iters=150, **settings), holdout=0)
    assert {k: end.meta["config"][k] for k in ("lr", "ce_weight", "tv_weight", "anchor_weight")} == \
        {"lr": 0.01, "ce_weight": 1.0, "tv_weight": 0.5, "anchor_weight": 10.0}
    low, high = (b.reshape(1, 3, 1, 1) for b in CIFAR.pixel_box(3))
    assert (end.images >= low - 1e-5).all() and (end.images <= high + 1e-5).all()

    targets = np.array(end.meta["target_classes"])
    assert targets.shape == (16,) and len(set(targets)) >= 5
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def hits(images):
        return float((session.run(None, {session.get_inputs()[0].name: images})[0].argmax(1) == targets).mean())

    assert hits(end.images) >= 0.8 and hits(start.images) <= 0.5


def test_the_anchor_holds_inversion_near_the_statistics_of_its_start(folded_resnet20):
    """Each Conv output's channel statistics are held to the procedural start's: with the
    anchor the images end nearer their start than without it."""
    path = str(folded_resnet20["folded"])
    settings = dict(method="inversion", num_samples=16, preprocess=CIFAR, device="cpu", iters=60)
    start = synthesize(path, SynthConfig(iters=0, **{k: v for k, v in settings.items() if k != "iters"}),
                       holdout=0).images
    anchored = synthesize(path, SynthConfig(**settings), holdout=0).images
    free = synthesize(path, SynthConfig(anchor_weight=0.0, **settings), holdout=0).images
    assert np.linalg.norm(anchored - start) < 0.8 * np.linalg.norm(free - start)


def test_fold_bn_writes_a_twin_without_bn_and_with_parity(folded_resnet20):
    import onnx

    model = onnx.load(str(folded_resnet20["folded"]))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    module = folded_resnet20["fold_bn"]
    images = module.load_images(str(folded_resnet20["data"]), 100, 32, module.IMAGENET)
    check = module.parity(str(folded_resnet20["kept"]), model, images)
    assert check["agreement"] == 1.0 and check["max_rel_diff"] < 1e-4


def test_quantize_folded_model_by_default_tells_which_source_and_why(tiny, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["quantize", str(tiny["folded"]), "--w8a8", "--num-samples", "8",
                                      "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "method procedural (the model carries no BN statistics" in result.stderr
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["method"] == "procedural" and calibration["requested"] == "auto"
    assert "no BN statistics" in calibration["method_choice"] and out.exists()
    # the synthesis settings given for whatever auto decides: procedural images read none of
    # them, which is said (the same command serves models with BN statistics), not refused
    out.unlink()
    result = CliRunner().invoke(cli, ["quantize", str(tiny["folded"]), "--w8a8", "--num-samples", "8", "--iters", "50",
                                      "--lr", "0.05", "-o", str(out)])
    assert result.exit_code == 0 and out.exists(), result.output
    assert ("quantize: --lr and --iters change nothing for --calib procedural: its images are drawn once, not "
            "optimised (auto: the model carries no BN statistics") in result.stderr, result.stderr


@pytest.mark.parametrize("calib", ["dsg", "zeroq"])
def test_quantize_folded_model_with_a_bn_method_asked_for_exits_2(tiny, tmp_path, calib):
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["quantize", str(tiny["folded"]), "--calib", calib, "-o", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "carries no BatchNorm statistics" in result.stderr and "--calib auto" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_inspect_names_the_source_quantize_will_use(tiny):
    assert inspect_model(str(tiny["folded"]))["calibration"]["method"] == "procedural"
    assert inspect_model(str(tiny["kept"]))["calibration"]["method"] == "dsg"
    result = CliRunner().invoke(cli, ["inspect", str(tiny["folded"])])
    assert result.exit_code == 0 and "(--calib auto) synthesizes procedural" in result.output


def test_quantized_folded_resnet20_on_procedural_images_agrees_with_fp32(folded_resnet20, tmp_path):
    """The default path on a real folded model: W8A8 on procedural images, validated on 300
    real test images (the benchmark of record has the accuracy across sources)."""
    from dsgonnx import ValidateConfig, validate
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.preprocess import scan_image_folder
    from dsgonnx.validation.data import open_dataset

    path, out = str(folded_resnet20["folded"]), tmp_path / "q.onnx"
    result = quantize(path, QuantConfig(num_samples=32, preprocess=CIFAR, output=str(out), validate=False,
                                        device="cpu"))
    assert result.calibration["method"] == "procedural"
    files = scan_image_folder(str(folded_resnet20["data"])).files
    held = open_dataset(load_model(path).input, str(folded_resnet20["data"]), CIFAR,
                        exclude_files=frozenset(files) - frozenset(files[::33]))
    report = validate(path, str(out), ValidateConfig(), images=held.batch(0, held.size), labels=held.labels).to_dict()
    assert report["num_samples"] >= 300 and report["fp32"]["top1"] > 70
    assert report["agreement"] >= 0.95 and report["drop_top1"] <= 2.0
