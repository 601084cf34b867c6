"""Channels-last (NHWC) models, as TensorFlow exports them, end to end.

dsgonnx works on a channels-first twin (a Transpose in front) and hands the user back their
interface: synthetic sets are written NHWC, the quantized model takes the NHWC input under
the same name, and every command accepts the model as it is.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from dsgonnx import QuantConfig, RefineConfig, inspect, quantize
from dsgonnx.graph.layout import channels_first_input
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.validation.metrics import top1_agreement
from dsgonnx_cli.main import cli
from zoo import export_tiny_nhwc, export_tiny_resnet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nhwc")
    return {"folder": folder, "nhwc": export_tiny_nhwc(folder / "nhwc.onnx"),
            "dynamic": export_tiny_nhwc(folder / "dynamic.onnx", dynamic_hw=True),
            "nchw": export_tiny_resnet(folder / "nchw.onnx")}


def _run(path, images):
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def _input_dims(path):
    value = onnx.load(str(path)).graph.input[0]
    return value.name, [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]


def test_an_nhwc_model_is_worked_on_through_an_exact_channels_first_twin(models):
    loaded = load_model(models["nhwc"])
    assert loaded.layout == "NHWC" and loaded.source == models["nhwc"] and loaded.path != models["nhwc"]
    assert loaded.input.shape == (None, 3, 16, 16)
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    # the twin is the file behind a Transpose: the same logits for the same images
    np.testing.assert_allclose(_run(loaded.path, images), _run(models["nhwc"], loaded.in_file_layout(images)), atol=1e-5)
    # and it is the NCHW network the NHWC file wraps
    np.testing.assert_allclose(_run(loaded.path, images), _run(models["nchw"], images), atol=1e-5)
    info = inspect(models["nhwc"])
    assert info["input"]["layout"] == "NHWC" and info["input"]["shape"] == [None, 16, 16, 3]
    assert info["file"] == str(models["nhwc"]) and info["torch_parity"]["top1_agreement"] == 1.0
    assert info["op_histogram"]["Transpose"] == 1  # the file's own, not the twin's
    assert info["bn_count"] == 6


def test_dynamic_nhwc_sizes_take_input_shape_in_either_layout(models):
    for given in ("1x16x16x3", "1x3x16x16"):
        assert load_model(models["dynamic"], given).input.shape == (None, 3, 16, 16)
    result = CliRunner().invoke(cli, ["inspect", str(models["dynamic"])])
    assert result.exit_code == 2 and "NxHxWx3" in result.stderr and "1x224x224x3" in result.stderr


def test_synthesize_quantize_validate_analyze_keep_the_nhwc_contract(models):
    folder, runner = models["folder"], CliRunner()
    npz = folder / "set.npz"
    result = runner.invoke(cli, ["synthesize", str(models["nhwc"]), "-o", str(npz), "--num-samples", "32",
                                 "--holdout", "16", "--iters", "20", "--quiet"])
    assert result.exit_code == 0, result.output
    data = np.load(npz)
    assert data["images"].shape == (32, 16, 16, 3) and data["holdout"].shape == (16, 16, 16, 3)
    assert json.loads(str(data["meta"]))["layout"] == "NHWC"
    out, report = folder / "q.onnx", folder / "held.json"
    result = runner.invoke(cli, ["quantize", str(models["nhwc"]), "--w8a8", "--calib", str(npz), "--num-samples", "32",
                                 "-o", str(out), "--quiet", "--report", str(report)])
    assert result.exit_code == 0, result.output
    # validated without --val-data on the set's held-out samples, fed channels last as the file takes them
    assert json.loads(report.read_text())["num_samples"] == 16
    assert _input_dims(out) == ("input", ["N", 16, 16, 3])  # the user's interface, unchanged
    decisions = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["dsgonnx.decisions"])
    assert decisions["input_layout"].startswith("NHWC")
    held = data["holdout"]
    assert top1_agreement(_run(models["nhwc"], held), _run(out, held)) >= 0.9
    # the quantized model is the twin's QDQ model behind the Transpose: stripping it gives NCHW back
    stripped = onnx.load(str(out))
    channels_first_input(stripped, "input")
    np.testing.assert_allclose(_run(stripped.SerializeToString(), held.transpose(0, 3, 1, 2).copy()), _run(out, held),
                               atol=1e-5)
    report = folder / "report.json"
    result = runner.invoke(cli, ["validate", str(models["nhwc"]), str(out), "--data", str(npz), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["agreement"] >= 0.9
    result = runner.invoke(cli, ["analyze", str(models["nhwc"]), "--w6a6", "--num-samples", "16", "--iters", "10",
                                 "--report", str(folder / "analysis.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "analysis.json").read_text())["tensors"]


def test_quantize_on_its_own_synthesis_and_refinement_validates_on_nhwc_samples(models):
    result = quantize(str(models["nhwc"]), QuantConfig(
        wbits=4, abits=4, num_samples=32, iters=20, holdout=16, output=str(models["folder"] / "q4.onnx"), force=True,
        refine=RefineConfig(method="brecq", iters=20)))
    assert _input_dims(result.output) == ("input", ["N", 16, 16, 3])
    assert result.report.to_dict()["num_samples"] == 16  # the held-out synthetic samples, fed channels last
    fidelity = result.decisions["refine"]["fidelity"]
    assert fidelity["agreement"] >= 0.9 and fidelity["sqnr_db"] >= 30, fidelity
