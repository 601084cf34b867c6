"""dsgonnx analyze: per-tensor sensitivity measured on edits of the exported QDQ model."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import dsgonnx
from dsgonnx import QuantConfig
from dsgonnx.sensitivity import float_parts, quant_points, with_float
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyze")
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    poisoned = calib.copy()
    poisoned[0, 0, 0, 0] = 400.0  # one outlier pixel: the input's range, and so its grid, becomes coarse
    np.savez(folder / "calib.npz", images=calib)
    np.savez(folder / "poisoned.npz", images=poisoned)
    held = rng.standard_normal((64, 3, 16, 16)).astype(np.float32)
    model = export_tiny_resnet(folder / "res.onnx")
    labels = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": held})[0].argmax(1)
    np.savez(folder / "held.npz", images=held, labels=labels)
    return {"folder": folder, "model": model}


def _run(path, images):
    return ort.InferenceSession(onnx.load(str(path)).SerializeToString() if not isinstance(path, onnx.ModelProto)
                                else path.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": images})[0]


def test_every_point_float_is_the_float_model_and_none_float_is_the_export(setup, tmp_path):
    from dsgonnx.quant.qdq import pre_process

    result = dsgonnx.quantize(setup["model"], QuantConfig(calib=str(setup["folder"] / "calib.npz"), num_samples=16,
                                                          validate=False, output=str(tmp_path / "q.onnx")))
    qdq = onnx.load(str(result.output))
    points = quant_points(qdq)
    kinds = {p.kind for p in points}
    assert kinds == {"weight", "activation"} and any(p.name == "input" for p in points)
    parts = float_parts(onnx.load(str(pre_process(setup["model"], tmp_path / "prep.onnx"))), qdq)
    images = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    fp, exported = _run(setup["model"], images), _run(result.output, images)
    np.testing.assert_allclose(_run(with_float(qdq, points, parts), images), fp, atol=1e-4)
    np.testing.assert_array_equal(_run(with_float(qdq, [], parts), images), exported)
    assert parts.activations  # ORT folded Relus into the ranges; the float edit puts them back


def test_a_weight_made_float_stays_float_in_the_probes(setup, tmp_path):
    """ORT's optimizer quantizes a float weight that meets a dequantized input (int8, per
    tensor): the probes must run the edit as written, i.e. match the unoptimized graph."""
    from dsgonnx.quant.qdq import pre_process
    from dsgonnx.sensitivity import _outputs

    result = dsgonnx.quantize(setup["model"], QuantConfig(calib=str(setup["folder"] / "calib.npz"), num_samples=16,
                                                          wbits=6, abits=6, validate=False,
                                                          output=str(tmp_path / "q.onnx")))
    qdq = onnx.load(str(result.output))
    parts = float_parts(onnx.load(str(pre_process(setup["model"], tmp_path / "prep.onnx"))), qdq)
    edited = tmp_path / "weights-float.onnx"
    onnx.save(with_float(qdq, [p for p in quant_points(qdq) if p.kind == "weight"], parts), str(edited))
    images = np.random.default_rng(2).standard_normal((8, 3, 16, 16)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = ort.InferenceSession(str(edited), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": images})[0]
    requantized = _run(edited, images)  # ORT's default session
    assert np.abs(requantized - as_written).max() > 1e-3  # ORT does change it (else this test proves nothing)
    np.testing.assert_allclose(_outputs(edited, "input", images, 8), as_written.reshape(8, -1), rtol=1e-5, atol=1e-5)


def test_a_coarse_input_grid_shows_where_it_is(setup, tmp_path):
    """One outlier pixel among the calibration images coarsens the input's grid: the input's
    damage (SQNR with only it quantized) falls by far more than any weight's (the first
    layer's falls a little too: its int32 bias is quantized on input scale × weight scale)."""
    reports = {}
    for name in ("calib", "poisoned"):
        reports[name] = dsgonnx.analyze(setup["model"], QuantConfig(calib=str(setup["folder"] / f"{name}.npz"),
                                                                     num_samples=16, bias_correction="off"),
                                        data=str(setup["folder"] / "held.npz"), eval_samples=64,
                                        report=tmp_path / f"{name}.json", chart=tmp_path / f"{name}.png")
    alone = {name: {t.tensor: t.alone["sqnr_db"] for t in report.tensors} for name, report in reports.items()}
    fall = {tensor: alone["calib"][tensor] - alone["poisoned"][tensor] for tensor in alone["calib"]}
    weights = [t.tensor for t in reports["calib"].tensors if t.kind == "weight"]
    assert fall["input"] > 10 and fall["input"] > 2 * max(abs(fall[w]) for w in weights), fall
    poisoned = reports["poisoned"]
    worst_two = [t.tensor for t in poisoned.ranked()[:2]]
    assert "input" in worst_two, worst_two
    assert "top1" in poisoned.full and poisoned.fp32["top1"] == 100.0  # labels are the float model's classes
    saved = json.loads((tmp_path / "poisoned.json").read_text())
    assert [t["tensor"] for t in saved["tensors"]] == [t.tensor for t in poisoned.ranked()]
    assert (tmp_path / "poisoned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_analyze_data_free_and_bad_input(setup, tmp_path):
    args = ["analyze", str(setup["model"]), "--calib", "gaussian", "--num-samples", "8", "--holdout", "16", "--quiet"]
    result = CliRunner().invoke(cli, args + ["--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.stderr
    assert "most damaging" in result.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["samples"]["source"] == "held-out gaussian samples" and saved["samples"]["count"] == 16
    bad = CliRunner().invoke(cli, args + ["--report", str(tmp_path / "r.txt")])
    assert bad.exit_code == 2 and "--report must be a .json file" in bad.stderr, bad.stderr
    bad = CliRunner().invoke(cli, args + ["--eval-samples", "0"])
    assert bad.exit_code == 2 and "--eval-samples must be at least 1" in bad.stderr, bad.stderr
    bad = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--calib", str(setup["folder"] / "calib.npz")])
    assert bad.exit_code == 2 and "needs --data" in bad.stderr, bad.stderr
    # said before quantizing (nothing on stderr but the error)
    assert "dsgonnx synthesize --holdout N" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    # a saved set brings its held-out samples: data-free on those
    rng = np.random.default_rng(3)
    held = dsgonnx.SyntheticSet(rng.standard_normal((8, 3, 16, 16)).astype(np.float32), {"method": "zeroq"},
                                rng.standard_normal((6, 3, 16, 16)).astype(np.float32)).save(tmp_path / "held.npz")
    result = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--calib", str(held), "--num-samples", "8",
                                      "--report", str(tmp_path / "held.json"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    samples = json.loads((tmp_path / "held.json").read_text())["samples"]
    assert (samples["source"], samples["count"], samples["labelled"]) == ("held-out zeroq samples", 6, False)
    # real images beyond the --num-samples calibrated on: data-free on 16 of those not calibrated on
    result = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--calib", str(setup["folder"] / "held.npz"),
                                      "--num-samples", "8", "--report", str(tmp_path / "real.json"), "--quiet"])
    assert result.exit_code == 0, result.stderr
    samples = json.loads((tmp_path / "real.json").read_text())["samples"]
    assert (samples["source"], samples["count"], samples["labelled"]) == ("held-out real images", 16, False)


def test_a_model_without_quantizable_tensors_is_one_line_exit_2(tmp_path):
    from onnx import TensorProto, helper

    from zoo import make_model

    # a "classifier" that only averages its input: nothing for ORT to quantize
    model = make_model([helper.make_node("ReduceMean", ["input"], ["out"], axes=[2, 3], keepdims=0)],
                       [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                       [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3])], ir_version=10)
    onnx.save(model, str(tmp_path / "mean.onnx"))
    result = CliRunner().invoke(cli, ["analyze", str(tmp_path / "mean.onnx"), "--calib", "gaussian", "--num-samples",
                                      "4", "--quiet"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no quantized tensors to analyze" in result.stderr


def test_a_given_quantized_model_is_analyzed_as_the_one_analyze_makes(setup, tmp_path):
    """--quantized: the same figures as analyze quantizing with the same settings itself, so a
    model made elsewhere (a GPU machine) can be taken apart here; --exact runs the probes as written."""
    config = QuantConfig(calib=str(setup["folder"] / "calib.npz"), num_samples=16)
    held = str(setup["folder"] / "held.npz")
    made = dsgonnx.quantize(setup["model"], replace(config, validate=False, output=str(tmp_path / "q.onnx")))
    own = dsgonnx.analyze(setup["model"], config, data=held, eval_samples=64)
    given = dsgonnx.analyze(setup["model"], data=held, eval_samples=64, quantized=made.output)
    assert given.full == own.full and len(given.tensors) == len(own.tensors) > 5
    assert {t.tensor: t.alone for t in given.tensors} == {t.tensor: t.alone for t in own.tensors}
    assert given.bits["given"] == str(made.output) and given.bits["tag"] == "W8A8"
    exact = dsgonnx.analyze(setup["model"], data=held, eval_samples=64, quantized=made.output, exact=True)
    assert exact.samples["arithmetic"] == "exact" and given.samples["arithmetic"] == "native"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    written = ort.InferenceSession(str(made.output), options, providers=["CPUExecutionProvider"])
    images = np.load(held)["images"]
    fp, q = _run(setup["model"], images), written.run(None, {"input": images})[0]
    sqnr = 10 * np.log10(np.sum(fp.astype(np.float64) ** 2) / np.sum((fp - q).astype(np.float64) ** 2))
    assert exact.full["sqnr_db"] == pytest.approx(sqnr, abs=2e-3)


def test_cli_analyze_quantized_refuses_what_does_not_apply(setup, tmp_path):
    q = tmp_path / "q.onnx"
    dsgonnx.quantize(setup["model"], QuantConfig(calib=str(setup["folder"] / "calib.npz"), num_samples=16,
                                                 validate=False, output=str(q)))
    held = str(setup["folder"] / "held.npz")
    ok = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--quantized", str(q), "--data", held, "--quiet"])
    assert ok.exit_code == 0 and "most damaging" in ok.stdout, ok.stderr
    bad = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--quantized", str(q), "--data", held, "--w4a4"])
    assert bad.exit_code == 2 and "--w4a4 is a quantize option" in bad.stderr, bad.stderr
    bad = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--quantized", str(q)])
    assert bad.exit_code == 2 and "needs --data" in bad.stderr and "Traceback" not in bad.output, bad.stderr
    other = tmp_path / "other.onnx"  # the same network, another weight: another model
    model = onnx.load(str(setup["model"]))
    model.graph.initializer[0].raw_data = bytes(reversed(model.graph.initializer[0].raw_data))
    onnx.save(model, str(other))
    bad = CliRunner().invoke(cli, ["analyze", str(other), "--quantized", str(q), "--data", held])
    assert bad.exit_code == 2 and "quantized from another model" in bad.stderr, bad.stderr
    bad = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--quantized", str(setup["model"]), "--data", held])
    assert bad.exit_code == 2 and "not written by dsgonnx quantize" in bad.stderr, bad.stderr
    bad = CliRunner().invoke(cli, ["analyze", str(setup["model"]), "--quantized", str(tmp_path / "none.onnx"),
                                   "--data", held])
    assert bad.exit_code == 2 and "cannot load the quantized model" in bad.stderr, bad.stderr
