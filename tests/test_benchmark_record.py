"""The benchmark of record's bookkeeping: runs merged into one model's section keep the
machine each command ran on (RESULTS.md names every one), and new cells replace old ones;
bit widths where weights and activations differ (``--bits w4a8``) are quantized as named
and kept as their own cells."""
import io
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quant_table import (ONLY_AT, bits_label, handful, held_out, markdown, parse_bits, run_table,  # noqa: E402
                         score_pending, widths)
from run_all import _machines, _merged  # noqa: E402


def _run(command: str, machine: str, rows: dict) -> dict:
    bits = sorted(set(parse_bits(",".join(b for r in rows.values() for b in r["top1"]))), key=widths, reverse=True)
    return {"profile": "cpu", "eval_images": 900, "rows": rows, "bits": bits, "commands": [command],
            "machine": machine, "wall_seconds": 10}


def test_merged_runs_keep_each_commands_machine():
    first = _run("run A", "Linux (AMD EPYC)", {"real": {"top1": {"8": [70.0, 0.0], "4": [20.0, 0.0]}}})
    second = _run("run B", "Linux (Intel Xeon)", {"real": {"top1": {"4": [25.0, 0.0]}},
                                                  "real+refine": {"top1": {"4": [30.0, 0.0]}}})
    merged = _merged(_merged(None, first), second)
    assert merged["ran_on"] == {"run A": "Linux (AMD EPYC)", "run B": "Linux (Intel Xeon)"}
    assert _machines(merged) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]
    assert merged["rows"]["real"]["top1"] == {"8": [70.0, 0.0], "4": [25.0, 0.0]}  # the new cell replaces
    assert merged["wall_seconds"] == 20 and merged["bits"] == [8, 4]
    # the same machine again is named once
    third = _run("run C", "Linux (Intel Xeon)", {"real+refine": {"top1": {"8": [71.0, 0.0]}}})
    assert _machines(_merged(merged, third)) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]


def test_a_section_merged_before_commands_carried_their_machine_still_names_its_one():
    legacy = dict(_run("run A", "Linux (AMD EPYC)", {"real": {"top1": {"8": [70.0, 0.0]}}}),
                  commands=["run A", "run A2"])  # two commands, one machine recorded for both
    assert _machines(legacy) == ["Linux (AMD EPYC)"]
    merged = _merged(legacy, _run("run B", "Linux (Intel Xeon)", {"real+refine": {"top1": {"8": [71.0, 0.0]}}}))
    assert merged["ran_on"] == {"run B": "Linux (Intel Xeon)"}  # nothing invented for A and A2
    assert _machines(merged) == ["Linux (AMD EPYC)", "Linux (Intel Xeon)"]


def test_bit_widths_where_weights_and_activations_differ_are_their_own_keys():
    assert parse_bits("8, 6,w4a8,W8A4,w4a4") == [8, 6, "w4a8", "w8a4", 4]
    with pytest.raises(SystemExit, match="'w4'"):
        parse_bits("8,w4")
    assert [bits_label(k) for k in (8, "4", "w4a8")] == ["W8A8", "W4A4", "W4A8"]
    # the variants that act only at some widths, per side
    assert not ONLY_AT["mixed"](4, 8) and ONLY_AT["mixed"](4, 6) and ONLY_AT["mixed"](8, 6)
    assert ONLY_AT["nofirst"](8, 4) and not ONLY_AT["nofirst"](8, 8)
    first = _run("run A", "Linux (AMD EPYC)", {"real": {"top1": {"8": [70.0, 0.0], "4": [20.0, 0.0]}}})
    second = _run("run B", "Linux (AMD EPYC)", {"real": {"top1": {"w4a8": [40.0, 0.0]}},
                                                "real+refine": {"top1": {"w8a4": [30.0, 0.0]}}})
    merged = _merged(_merged(None, first), second)
    assert merged["rows"]["real"]["top1"] == {"8": [70.0, 0.0], "4": [20.0, 0.0], "w4a8": [40.0, 0.0]}
    assert merged["bits"] == [8, "w8a4", "w4a8", 4]


def test_a_table_quantizes_weights_and_activations_at_their_own_widths(shared, tmp_path):
    """run_table with --bits w4a8 writes 4-bit weights beside 8-bit activations (the first
    layer's weights kept at 8 bits), and its scored cell and column are W4A8's."""
    from dsgonnx.preprocess import preprocess_from_preset

    model, data = shared / "models" / "cifar10_resnet20.onnx", shared / "datasets" / "cifar10-test"
    recipe = preprocess_from_preset("imagenet", resize=32, crop=32)
    results = run_table(str(model), str(data), recipe, bits=parse_bits("w4a8"), sources=["real"], num_samples=16,
                        device="cpu", keep=str(tmp_path), log=io.StringIO())
    written = onnx.load(str(tmp_path / "real-0-w4a8.onnx"))
    weights = {i.name for i in written.graph.initializer if len(i.dims) == 4}
    zero_points = {i.name: i.data_type for i in written.graph.initializer}
    weight_types = [zero_points[n.input[2]] for n in written.graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    activation_types = {zero_points[n.input[2]] for n in written.graph.node if n.op_type == "QuantizeLinear"}
    assert weight_types.count(onnx.TensorProto.INT4) == len(weight_types) - 1  # all but the first layer's
    assert onnx.TensorProto.INT8 in weight_types and activation_types == {onnx.TensorProto.UINT8}
    scored = score_pending(results, tmp_path, str(model), str(data), recipe, max_eval=64, log=io.StringIO())
    assert list(scored["rows"]["real"]["top1"]) == ["w4a8"] and 10 < scored["rows"]["real"]["top1"]["w4a8"][0] <= 100
    assert "| calibration | W4A8 top-1 (drop) · agreement |" in markdown(scored)


def test_a_handful_of_photos_comes_from_the_calibration_files_and_is_scored_on_the_rest(shared):
    """Rows real+fewN calibrate on N of the real rows' calibration files, hold out others of them,
    and are scored on the same images as every row (none of which they saw)."""
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.preprocess import preprocess_from_preset

    model, data = shared / "models" / "cifar10_resnet20.onnx", shared / "datasets" / "cifar10-test"
    recipe = preprocess_from_preset("imagenet", resize=32, crop=32)
    loaded = load_model(str(model))
    photos = handful(loaded, str(data), recipe, num_samples=40, count=8, holdout=4)
    assert photos.images.shape == (8, 3, 32, 32) and photos.holdout.shape == (4, 3, 32, 32)
    scored, _ = held_out(loaded, str(data), recipe, 40, max_eval=200)
    seen = np.concatenate([photos.images, photos.holdout]).reshape(12, -1)
    assert len({row.tobytes() for row in seen}) == 12  # held out apart from the calibrated ones
    assert not {row.tobytes() for row in seen} & {row.tobytes() for row in scored.reshape(len(scored), -1)}
    results = run_table(str(model), str(data), recipe, bits=[8], sources=["real+few8+held"], num_samples=40,
                        device="cpu", max_eval=200, log=io.StringIO())
    assert 50 < results["rows"]["real+few8+held"]["top1"]["8"][0] <= 100  # ResNet-20 W8A8 on 8 photos
    assert "Rows `real+few8`: a handful of photos, that many of the 40 real calibration files" in markdown(results)
    with pytest.raises(SystemExit, match="one \\+fewN, on a real row"):
        run_table(str(model), str(data), recipe, bits=[8], sources=["gaussian+few8"], num_samples=40,
                  device="cpu", max_eval=200, log=io.StringIO())


def test_rerendering_without_matplotlib_keeps_the_chart_last_drawn(tmp_path):
    """``--models ''`` rewrites RESULTS.md from results.json; without matplotlib it cannot redraw
    results.png, and a chart drawn before stays linked (it used to drop out of RESULTS.md)."""
    import json

    from run_all import main

    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results.json").read_text())
    (tmp_path / "results.json").write_text(json.dumps({"cifar10_resnet20": record["cifar10_resnet20"]}))
    assert main(["--models", "", "--out", str(tmp_path)]) == 0
    assert "results.png" not in (tmp_path / "RESULTS.md").read_text()  # no chart at all: no link
    (tmp_path / "results.png").write_bytes(b"\x89PNG")
    assert main(["--models", "", "--out", str(tmp_path)]) == 0
    assert "![top-1 by method and bits](results.png)" in (tmp_path / "RESULTS.md").read_text()
