"""`validate --per-tensor`: every quantized activation of a QDQ model against the float model.

Real quantizations of a tiny ResNet (BN kept, a residual join), run in ONNX Runtime; the
grid-alone figures are checked against ORT's own QuantizeLinear/DequantizeLinear, and a QDQ
model whose one tensor's range was narrowed by hand must show the error entering there.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from dsgonnx.pipeline import quantize
from dsgonnx.quant import QuantConfig
from dsgonnx.quant.placement import read_placement
from dsgonnx.validation import ValidateConfig, validate
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("per-tensor")
    fp = export_tiny_resnet(folder / "tiny.onnx")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", images=rng.standard_normal((24, 3, 16, 16)).astype(np.float32))
    np.savez(folder / "val.npz", images=rng.standard_normal((20, 3, 16, 16)).astype(np.float32))
    out = {"folder": folder, "fp": fp, "val": folder / "val.npz"}
    for bits in (8, 4):
        out[bits] = folder / f"w{bits}a{bits}.onnx"
        quantize(str(fp), QuantConfig(output=str(out[bits]), calib=str(folder / "calib.npz"), num_samples=24,
                                      wbits=bits, abits=bits, first_layer_8bit=False, validate=False))
    return out


def _per_tensor(models, q_path):
    return validate(str(models["fp"]), str(q_path), ValidateConfig(data=str(models["val"]), per_tensor=True))


def test_every_quantized_activation_is_measured_in_the_float_models_order(models):
    report = _per_tensor(models, models[8])
    tensors = report.per_tensor.tensors
    placement = read_placement(onnx.load(str(models[8])))
    assert {t.tensor for t in tensors} == set(placement.activations) and not report.per_tensor.unmatched
    fp = onnx.load(str(models["fp"]))
    order = ["input"] + [out for node in fp.graph.node for out in node.output]
    positions = [order.index(t.tensor) for t in tensors]
    assert positions == sorted(positions) and tensors[0].tensor == "input"
    # the model input carries no error from before: the quantized model's value is the grid's
    assert tensors[0].sqnr_db == pytest.approx(tensors[0].grid_sqnr_db, abs=1e-4)
    assert report.per_tensor.num_samples == 20
    # 4 bits everywhere: every tensor's grid costs more than at 8 bits, and more error is carried
    four = {t.tensor: t for t in _per_tensor(models, models[4]).per_tensor.tensors}
    assert set(four) == {t.tensor for t in tensors}
    for t in tensors:
        assert four[t.tensor].grid_sqnr_db < t.grid_sqnr_db - 10, t.tensor
        assert four[t.tensor].sqnr_db < t.sqnr_db, t.tensor


def _ort_grid(values: np.ndarray, scale: float, zero_point: int, zero_type: int) -> np.ndarray:
    """ORT's own QuantizeLinear -> DequantizeLinear of ``values``."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"),
             helper.make_tensor("z", zero_type, [], [zero_point])]
    graph = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                               helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "grid",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(values.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(values.shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": values})[0]


def _outputs(path, names, images, as_written=False):
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(names, {"input": images})


@pytest.mark.parametrize("bits", [8, 4])
def test_the_figures_are_those_onnx_runtime_computes(models, bits):
    report = _per_tensor(models, models[bits])
    q_model = onnx.load(str(models[bits]))
    placement = read_placement(q_model)
    zero_types = {n.input[0]: next(i.data_type for i in q_model.graph.initializer if i.name == n.input[2])
                  for n in q_model.graph.node if n.op_type == "QuantizeLinear"}
    images = np.load(models["val"])["images"]
    for t in report.per_tensor.tensors[1:]:
        grid = placement.activations[t.tensor]
        (f,) = _outputs(models["fp"], [t.tensor], images)
        (q,) = _outputs(models[bits], [placement.dequantized[t.tensor]], images, as_written=True)
        on_grid = _ort_grid(f, grid.scale, grid.zero_point, zero_types[t.tensor])
        f, q, on_grid = (a.astype(np.float64) for a in (f, q, on_grid))
        assert t.sqnr_db == pytest.approx(10 * np.log10(np.square(f).sum() / np.square(f - q).sum()), abs=1e-3)
        assert t.grid_sqnr_db == pytest.approx(10 * np.log10(np.square(f).sum() / np.square(f - on_grid).sum()),
                                               abs=1e-3)
        low, high = (grid.zero_point - grid.low) * -grid.scale, (grid.high - grid.zero_point) * grid.scale
        outside = np.mean((f < low - grid.scale / 2) | (f > high + grid.scale / 2))
        assert t.clipped == pytest.approx(outside, abs=1e-3)


def test_a_narrowed_range_shows_where_the_error_enters(models, tmp_path):
    before = _per_tensor(models, models[8])
    tensors = [t.tensor for t in before.per_tensor.tensors]
    target = tensors[len(tensors) // 2]
    model = onnx.load(str(models[8]))
    (q_node,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == target]
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == q_node.input[1])
    model.graph.initializer.append(numpy_helper.from_array((scale / 16).astype(np.float32), "narrowed_scale"))
    readers = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q_node.output[0]]
    for node in [q_node, *readers]:  # this tensor alone, even where its scale was shared
        node.input[1] = "narrowed_scale"
    narrowed_path = tmp_path / "narrowed.onnx"
    onnx.save(model, str(narrowed_path))
    after = _per_tensor(models, narrowed_path)
    old = {t.tensor: t for t in before.per_tensor.tensors}
    new = {t.tensor: t for t in after.per_tensor.tensors}
    for name in tensors[:tensors.index(target)]:  # before it: the same computation
        assert new[name].sqnr_db == pytest.approx(old[name].sqnr_db, abs=1e-9), name
    assert new[target].clipped > 0.2 > old[target].clipped
    assert new[target].grid_sqnr_db < old[target].grid_sqnr_db - 10
    assert new[target].sqnr_db < old[target].sqnr_db - 10
    assert after.metrics.sqnr_db < before.metrics.sqnr_db


def test_cli_prints_and_reports_the_tensors_and_refuses_a_model_without_qdq(models, tmp_path):
    runner = CliRunner()
    report = tmp_path / "report.json"
    result = runner.invoke(cli, ["validate", str(models["fp"]), str(models[4]), "--data", str(models["val"]),
                                 "--per-tensor", "--report", str(report)])
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())["per_tensor"]
    placement = read_placement(onnx.load(str(models[4])))
    assert {t["tensor"] for t in written["tensors"]} == set(placement.activations)
    assert written["num_samples"] == 20 and written["arithmetic"] == "exact"
    assert "per tensor (20 samples" in result.output
    assert all(name in result.output for name in placement.activations if len(name) < 60)
    plain = tmp_path / "plain.json"
    assert runner.invoke(cli, ["validate", str(models["fp"]), str(models[4]), "--data", str(models["val"]),
                               "--report", str(plain)]).exit_code == 0
    assert json.loads(plain.read_text())["per_tensor"] is None
    refused = tmp_path / "refused.json"
    result = runner.invoke(cli, ["validate", str(models["fp"]), str(models["fp"]), "--data", str(models["val"]),
                                 "--per-tensor", "--report", str(refused)])
    assert result.exit_code == 2
    assert "no activation is quantized" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not refused.exists()
