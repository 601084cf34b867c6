"""The Python API and the CLI are one product: same settings, same files; the CLI only
translates; the configuration is typed and stage-free; nothing process-wide is changed."""

from __future__ import annotations

import ast
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import dsgonnx
from dsgonnx import (DataError, Preprocess, QuantConfig, RefineConfig, SynthConfig, SynthMethod, SynthOptions,
                     SyntheticSet, device_defaults)
from dsgonnx_cli.main import cli
from zoo import export_torchscript

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    return {"folder": folder, "model": export_torchscript(folder / "tiny.onnx", keep_bn=True)}


def _cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr
    return result


def _graph_bytes(path) -> bytes:
    return onnx.load(str(path)).graph.SerializeToString()


def test_quantize_cli_and_api_write_the_same_model_with_the_same_cpu_defaults(tiny):
    folder = tiny["folder"]
    _cli("quantize", tiny["model"], "--w6a6", "--preprocess", "imagenet", "--num-samples", "8", "--holdout", "4",
         "-o", folder / "cli.onnx", "--quiet")
    result = dsgonnx.quantize(tiny["model"], QuantConfig(wbits=6, abits=6, preprocess=dsgonnx.PRESETS["imagenet"],
                                                         num_samples=8, holdout=4, output=str(folder / "api.onnx")))
    assert _graph_bytes(folder / "cli.onnx") == _graph_bytes(folder / "api.onnx")
    cpu = device_defaults("cpu")
    assert result.calibration["iters"] == cpu.synth_iters == 100  # the README's CPU default, from Python too
    meta = {p.key: p.value for p in onnx.load(str(folder / "cli.onnx")).metadata_props}
    assert '"iters": 100' in meta["dsgonnx.calibration"]


def test_synthesize_cli_and_api_give_the_same_images(tiny):
    folder = tiny["folder"]
    _cli("synthesize", tiny["model"], "--method", "zeroq", "--iters", "5", "--num-samples", "4", "-o",
         folder / "cli.npz", "--quiet")
    api = dsgonnx.synthesize(tiny["model"], SynthConfig(method="zeroq", iters=5, num_samples=4),
                             output=folder / "api.npz")
    for saved in (SyntheticSet.load(folder / "cli.npz"), SyntheticSet.load(folder / "api.npz")):
        np.testing.assert_array_equal(saved.images, api.images)
        np.testing.assert_array_equal(saved.holdout, api.holdout)  # both hold out the default 16
    assert api.holdout.shape == (dsgonnx.DEFAULT_HOLDOUT, 3, 16, 16)


def test_device_defaults_are_resolved_from_one_table():
    cpu, cuda = device_defaults("cpu"), device_defaults("cuda")
    assert (cpu.synth_iters, cpu.low_res, cpu.refine_iters) == (100, 128, 500)
    assert (cuda.synth_iters, cuda.low_res, cuda.refine_iters) == (500, None, 2000)
    config = SynthConfig()
    assert config.iters is None
    assert config.for_device("cpu", 224).iters == 100 and config.for_device("cpu", 224).low_res == 128
    assert config.for_device("cpu", 32).low_res is None  # small inputs run at full size
    assert config.for_device("cuda", 224).iters == 500 and config.for_device("cuda", 224).low_res is None
    explicit = SynthConfig(iters=30)  # an explicit count keeps the user's resolution (none)
    assert explicit.for_device("cpu", 224).iters == 30 and explicit.for_device("cpu", 224).low_res is None
    assert SynthConfig(low_res=0).for_device("cpu", 224).low_res is None  # 0 switches the schedule off
    assert RefineConfig().for_device("cpu").iters == 500 and RefineConfig().for_device("cuda").iters == 2000
    assert RefineConfig(method="brecq").for_device("cpu").drop_prob == 0.5
    assert RefineConfig(method="adaround").for_device("cpu").drop_prob == 0.0
    assert RefineConfig(method="brecq").for_device("cpu").input_drop == 0.5  # QDrop's one probability
    assert RefineConfig(method="brecq", drop_prob=0.0).for_device("cpu").input_drop == 0.0


def test_quantize_takes_a_method_a_path_an_array_or_a_synthetic_set(tiny, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", images=images)
    assert QuantConfig(calib="zeroq").calib is SynthMethod.ZEROQ and QuantConfig().synthetic
    assert QuantConfig(calib=str(tmp_path / "calib.npz")).calib == tmp_path / "calib.npz"
    written = {}
    for name, calib in {"path": tmp_path / "calib.npz", "array": images,
                        "set": SyntheticSet(images, {"method": "dsg"})}.items():
        result = dsgonnx.quantize(tiny["model"], QuantConfig(calib=calib, num_samples=8, validate=False,
                                                             output=str(tmp_path / f"{name}.onnx")))
        written[name] = _graph_bytes(result.output)
        assert result.calibration["num_samples"] == 8
    assert written["path"] == written["array"] == written["set"]  # the same images, the same model
    assert dsgonnx.quantize(tiny["model"], QuantConfig(calib=SyntheticSet(images, {"method": "dsg"}), num_samples=8,
                                                       validate=False, output=str(tmp_path / "m.onnx"))
                            ).calibration["method"] == "dsg"
    with pytest.raises(DataError, match="`calib` must be"):
        QuantConfig(calib=3.5)


def test_library_errors_name_parameters_and_the_cli_names_flags(tiny):
    with pytest.raises(DataError) as caught:
        QuantConfig(num_samples=0)
    assert "`num_samples`" in str(caught.value) and "--" not in str(caught.value)
    with pytest.raises(DataError, match="`lr` must be positive"):
        SynthOptions(lr=0)
    for bad in (float("inf"), float("nan")):  # was: _LinAlgError inside SCI's eigh, exit 3
        with pytest.raises(DataError, match="`lr` must be positive"):
            SynthOptions(lr=bad)
    result = CliRunner().invoke(cli, ["synthesize", str(tiny["model"]), "--lr", "inf"])
    assert result.exit_code == 2 and result.stderr.strip() == "dsgonnx: error: --lr must be positive, got inf"
    result = CliRunner().invoke(cli, ["quantize", str(tiny["model"]), "--num-samples", "0"])
    assert result.exit_code == 2 and "--num-samples must be at least 1" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["quantize", str(tiny["model"]), "--refine", "brecq", "--refine-drop", "2"])
    assert result.exit_code == 2 and "--refine-drop must be in [0, 1)" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["synthesize", str(tiny["model"]), "--epsilon", "2"])
    assert result.exit_code == 2 and "--epsilon must be between 0 and 1" in result.stderr, result.stderr


def test_config_choices_are_typed_and_serialise_as_strings():
    config = QuantConfig(calibrator="MSE", target="gpu", logits="float", refine="brecq",
                         synth=SynthOptions(slack_reading="channel-upper"), input_shape="1x3x16x16")
    assert config.calibrator == "mse" and config.target == dsgonnx.Target.GPU
    assert config.input_shape == (1, 3, 16, 16)
    data = config.to_dict()
    assert data["calibrator"] == "mse" and data["synth"]["slack_reading"] == "channel-upper"
    assert data["refine"]["method"] == "brecq" and data["calib"] == "auto"
    with pytest.raises(DataError, match="unknown `calibrator` 'median'"):
        QuantConfig(calibrator="median")


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def test_cli_modules_import_only_the_public_api():
    public = set(dsgonnx.__all__)
    files = sorted((ROOT / "cli").rglob("*.py"))
    assert files
    for path in files:
        for module, names in _imports(path):
            if module == "dsgonnx":
                assert set(names) <= public, f"{path.name} imports non-public {sorted(set(names) - public)}"
            else:
                assert not module.startswith("dsgonnx."), f"{path.name} imports {module}"


def test_every_public_name_resolves():
    for name in dsgonnx.__all__:
        assert getattr(dsgonnx, name) is not None
    assert callable(dsgonnx.validate) and callable(dsgonnx.quantize) and callable(dsgonnx.inspect)


def test_config_module_imports_no_stage_and_no_framework():
    code = ("import sys, dsgonnx.config; print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'onnx', 'onnxruntime', 'onnx2torch') or m.startswith('dsgonnx'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) <= {"dsgonnx", "dsgonnx.config", "dsgonnx.errors", "dsgonnx.inputs", "dsgonnx.preprocess"}, loaded


def test_one_input_spec_one_npz_reader_one_session_factory():
    """Each of these exists once in the library (a second copy is how they drifted apart)."""
    sources = {path: path.read_text() for path in (ROOT / "dsgonnx").rglob("*.py")}

    def where(pattern):
        return sorted(str(path.relative_to(ROOT)) for path, text in sources.items() if pattern in text)

    assert where("class InputSpec:") == ["dsgonnx/inputs.py"]
    assert where("np.load(") == ["dsgonnx/preprocess.py"]
    assert where("InferenceSession(") == ["dsgonnx/runtime.py"]
    assert where("def quantized_weights(") == ["dsgonnx/quant/qdq.py"]
    assert where("logging.disable") == [] and where("os.dup2") == ["dsgonnx/validation/sessions.py"]
    assert where("torch.manual_seed") == []


@pytest.mark.parametrize("recipe", [dsgonnx.PRESETS["imagenet"], dsgonnx.PRESETS["tf-lite"],
                                    Preprocess(mean=(10, 20, 30), std=(50, 60, 70), channel_order="BGR",
                                               pixel_scale=255.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_one_normalisation_with_its_inverse_and_pixel_box(recipe, channels):
    from dsgonnx.synth.generator import pixel_box
    from dsgonnx.synth.preview import to_pixels

    pixels = np.random.default_rng(0).integers(0, 256, (2, channels, 4, 5)).astype(np.float32)
    images = recipe.normalise(pixels)
    np.testing.assert_allclose(recipe.denormalise(images), pixels, atol=1e-3)
    low, high = recipe.pixel_box(channels)
    assert (images >= low - 1e-6).all() and (images <= high + 1e-6).all()
    box = pixel_box(SynthConfig(preprocess=recipe), channels)  # synthesis uses the same box
    np.testing.assert_array_equal(box[0].numpy(), low)
    shown = to_pixels(images, recipe)  # the preview shows the pixels back, for grey models too
    expected = pixels.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(shown, np.repeat(expected, 3, axis=3) if channels == 1 else expected)


def test_conversion_leaves_onnx2torch_registry_untouched(tiny):
    from onnx2torch.node_converters import registry

    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.graph.to_torch import to_torch

    before = dict(registry._CONVERTER_REGISTRY)
    to_torch(load_model(tiny["model"]))
    assert registry._CONVERTER_REGISTRY == before


def test_synthesis_never_reseeds_torch(tiny):
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        result = dsgonnx.synthesize(tiny["model"], SynthConfig(method="dsg", iters=3, num_samples=4, seed=0))
        draws.append((result.images, torch.rand(3)))
    np.testing.assert_array_equal(draws[0][0], draws[1][0])  # our seed alone decides the images
    assert not torch.equal(draws[0][1], draws[1][1])  # and the caller's RNG stream is left as it was


def test_ort_quantization_tools_are_silenced_without_silencing_other_loggers(caplog):
    from dsgonnx.runtime import quiet_ort

    other, ort_logger = logging.getLogger("someone.else"), logging.getLogger("onnxruntime.quantization.x")
    with caplog.at_level(logging.WARNING), quiet_ort():
        other.warning("still heard")
        ort_logger.error("not heard")
        print("swallowed")
    assert "still heard" in caplog.text and "not heard" not in caplog.text
    assert logging.root.manager.disable == 0 and logging.getLogger("onnxruntime").level == logging.NOTSET


@pytest.mark.parametrize("option, config, field", [
    ("--refine-start", RefineConfig, "start"), ("--refine-inside-means", RefineConfig, "inside_means"),
    ("--qat-data", dsgonnx.QatConfig, "data"), ("--qat-generator-loss", dsgonnx.QatConfig, "generator_loss"),
    ("--qat-optimizer", dsgonnx.QatConfig, "optimizer"), ("--qat-loss", dsgonnx.QatConfig, "loss"),
    ("--qat-start", dsgonnx.QatConfig, "start"), ("--qat-mix", dsgonnx.QatConfig, "mix")])
def test_the_cli_offers_exactly_the_values_the_config_accepts(option, config, field):
    command = cli.get_command(None, "quantize")
    param = next(p for p in command.params if option in p.opts)
    offered = list(param.type.choices)
    for value in offered:
        config(**{field: value})  # every value the CLI lets through builds a config
    with pytest.raises(DataError, match=field):
        config(**{field: "not-a-choice"})
    result = CliRunner().invoke(cli, ["quantize", "m.onnx", option, "not-a-choice"])
    assert result.exit_code == 2 and all(v in result.output for v in offered)  # click lists them all
