"""What dsgonnx writes: the umask's permissions, never over a file that appeared meanwhile
without --force, and a full disk said in one line (exit 2) with nothing replaced."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import dsgonnx.pipeline
from dsgonnx import DataError, QuantConfig
from dsgonnx.artifacts import SyntheticSet
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet, export_torchscript


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("writes")
    model = export_torchscript(folder / "tiny.onnx", keep_bn=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", images=rng.standard_normal((8, 3, 16, 16)).astype(np.float32))
    return {"folder": folder, "model": model, "calib": folder / "calib.npz"}


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_take_the_umask_permissions(setup, umask_027, tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--calib", "gaussian", "--num-samples", "8",
                                      "--holdout", "8", "-o", str(out), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "agreement" in json.dumps(json.loads(report.read_text()))
    assert _mode(out) == _mode(report) == umask_027  # not mkstemp's 0600, not a fixed 0644
    SyntheticSet(images=np.zeros((2, 3, 16, 16), np.float32)).save(tmp_path / "s.npz")
    assert _mode(tmp_path / "s.npz") == umask_027
    os.umask(0o022)
    SyntheticSet(images=np.zeros((2, 3, 16, 16), np.float32)).save(tmp_path / "t.npz")
    assert _mode(tmp_path / "t.npz") == 0o644


def test_a_file_that_appears_during_the_run_is_not_overwritten(setup, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    finish = dsgonnx.pipeline._finish_model

    def someone_else_writes(*args, **kwargs):
        finish(*args, **kwargs)
        out.write_bytes(b"theirs")

    monkeypatch.setattr(dsgonnx.pipeline, "_finish_model", someone_else_writes)
    config = QuantConfig(calib=str(setup["calib"]), num_samples=8, validate=False, output=str(out))
    with pytest.raises(DataError, match="appeared while dsgonnx was working"):
        dsgonnx.pipeline.quantize(str(setup["model"]), config)
    assert out.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["q.onnx"]  # no temporary file left
    result = dsgonnx.pipeline.quantize(str(setup["model"]), config, force=True)  # --force replaces it
    assert result.output == out and out.read_bytes()[:6] != b"theirs"
    npz = tmp_path / "s.npz"
    npz.write_bytes(b"theirs")
    with pytest.raises(DataError, match="appeared while dsgonnx was working"):
        SyntheticSet(images=np.zeros((2, 3, 16, 16), np.float32)).save(npz, replace=False)
    assert npz.read_bytes() == b"theirs" and sorted(os.listdir(tmp_path)) == ["q.onnx", "s.npz"]


def test_a_full_disk_is_one_line_exit_2_and_nothing_replaced(setup, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous model")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".q.onnx.tmp"))

    monkeypatch.setattr(dsgonnx.pipeline, "quantize_qdq", full)
    result = CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--calib", str(setup["calib"]),
                                      "--num-samples", "8", "--no-validate", "-o", str(out), "--force"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("dsgonnx: error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "no space left on the device" in lines[0], result.stderr
    assert out.read_bytes() == b"previous model" and os.listdir(tmp_path) == ["q.onnx"]


def test_the_model_file_is_read_once_and_a_replacement_changes_nothing(setup, tmp_path, monkeypatch):
    """Every stage works from private copies of the bytes read at load: a file replaced by
    another network mid-run (before pre-processing, which reads a file) leaves the output
    quantized from, and stamped with the hash of, what was read."""
    model = tmp_path / "model.onnx"
    model.write_bytes(setup["model"].read_bytes())
    original = model.read_bytes()
    out = tmp_path / "q.onnx"
    pre_process = dsgonnx.pipeline.pre_process

    def replaced(*args, **kwargs):
        export_tiny_resnet(model)  # another network now sits at the path
        return pre_process(*args, **kwargs)

    monkeypatch.setattr(dsgonnx.pipeline, "pre_process", replaced)
    config = QuantConfig(calib=str(setup["calib"]), num_samples=8, validate=False, output=str(out))
    result = dsgonnx.pipeline.quantize(str(model), config)
    assert model.read_bytes() != original
    written = onnx.load(str(result.output))
    stamped = {p.key: p.value for p in written.metadata_props}["dsgonnx.source_sha256"]
    assert stamped == hashlib.sha256(original).hexdigest()
    ops = {n.op_type for n in onnx.load_from_string(original).graph.node} - {"BatchNormalization"}
    assert {n.op_type for n in written.graph.node} - {"QuantizeLinear", "DequantizeLinear"} <= ops | {"Relu"}
    assert "Add" not in ops and not any(n.op_type == "Add" for n in written.graph.node)  # not the residual net


def _refused(args: list[str], *expected: str) -> None:
    """``args`` end in exit 2 and one line that names each of ``expected``, no traceback."""
    result = CliRunner().invoke(cli, args + (["--quiet"] if args[0] != "validate" else []))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("dsgonnx: error:"), result.output
    assert all(text in lines[0] for text in expected), lines[0]


def test_a_report_is_never_written_over_a_model_or_the_data(setup, tmp_path):
    """--report naming an input (or quantize's output) is refused before any work: it used to
    replace the file named with the JSON and exit 0."""
    quantized = tmp_path / "q.onnx"
    CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--calib", str(setup["calib"]), "--num-samples", "8",
                             "--no-validate", "-o", str(quantized)])
    labelled = tmp_path / "val.npz"
    np.savez(labelled, images=np.load(setup["calib"])["images"], labels=np.arange(8) % 10)
    files = [setup["model"], quantized, labelled, setup["calib"]]
    before = {path: path.read_bytes() for path in files}
    validate = ["validate", str(setup["model"]), str(quantized), "--data", str(labelled), "--report"]
    _refused(validate + [str(setup["model"])], "is the FP model")
    _refused(validate + [str(quantized)], "is the quantized model")
    _refused(validate + [str(labelled)], "is --data")
    out = tmp_path / "new.onnx"
    quantize = ["quantize", str(setup["model"]), "--calib", str(setup["calib"]), "--num-samples", "8", "--holdout",
                "0", "--val-data", str(labelled), "-o", str(out), "--report"]
    _refused(quantize + [str(setup["model"])], "is the input model")
    _refused(quantize + [str(out)], "is the output")
    _refused(quantize + [str(labelled)], "is --val-data")
    _refused(quantize + [str(setup["calib"])], "is --calib")
    assert {path: path.read_bytes() for path in files} == before and not out.exists()


def test_validation_data_that_cannot_be_scored_leaves_the_output_as_it_was(setup, tmp_path):
    """quantize validates the finished model before it replaces anything: bad --val-data used to
    be found after the model was written, over the previous one with --force."""
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous model")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, images=np.zeros((4, 3, 16, 16), np.float32))
    common = ["quantize", str(setup["model"]), "--calib", str(setup["calib"]), "--num-samples", "8", "-o", str(out),
              "--force"]
    _refused(common + ["--val-data", str(wrong)], "images have shape (4, 3, 8, 8)")
    _refused(common + ["--val-data", str(unlabelled), "--max-drop", "1"], "label")
    assert out.read_bytes() == b"previous model" and sorted(os.listdir(tmp_path)) == ["q.onnx", "unlabelled.npz",
                                                                                       "wrong.npz"]
    report = tmp_path / "r.json"
    _refused(common + ["--report", str(report)], "--report has nothing to score on")  # was: no report, exit 0
    # data it can score: the model and then the report, naming the output
    result = CliRunner().invoke(cli, common + ["--num-samples", "4", "--holdout", "4", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"previous model" and json.loads(report.read_text())["models"] == {
        "fp32": str(setup["model"]), "quantized": str(out)}


def _class_folders(root, names) -> None:
    from PIL import Image

    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / name / "0.png")


def test_validation_data_are_checked_before_any_work(setup, tmp_path, monkeypatch):
    """What the validation would refuse in --val-data is found before calibration (it was found
    once the model was made: minutes of synthesis and reconstruction lost), and a folder that
    holds a subset of the classes is labelled by --classes in quantize as in validate."""
    out = tmp_path / "q.onnx"
    common = ["quantize", str(setup["model"]), "--calib", str(setup["calib"]), "--num-samples", "8", "-o", str(out),
              "--resize", "16", "--crop", "16"]
    subset = tmp_path / "subset"
    _class_folders(subset, ["c3", "c7"])
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    (tmp_path / "nine.txt").write_text("\n".join(f"c{i}" for i in range(9)) + "\n")
    labels = tmp_path / "labels.npz"
    np.savez(labels, images=np.zeros((4, 3, 16, 16), np.float32), labels=np.array([0, 1, 2, 10]))

    def calibrated(*args, **kwargs):
        raise AssertionError("calibrated before the validation data were checked")

    monkeypatch.setattr(dsgonnx.pipeline, "_calibration_data", calibrated)
    _refused(common + ["--val-data", str(subset)], "has 2 class folders but the models output 10", "--classes")
    _refused(common + ["--val-data", str(subset), "--classes", str(tmp_path / "nine.txt")],
             "the class list names 9 classes but the models output 10")
    _refused(common + ["--val-data", str(subset), "--classes", str(tmp_path / "none.txt")], "cannot read class list")
    _refused(common + ["--val-data", str(labels)], "label 10 in", "out of range for a model with 10 classes")
    _refused(common + ["--val-data", str(labels), "--classes", str(names)], "--classes applies to image folders only")
    _refused(common + ["--classes", str(names)], "--classes labels the class folders of --val-data")
    _refused(common + ["--val-data", str(subset), "--classes", str(names), "--report", str(names)],
             "--report", "is --classes")
    monkeypatch.undo()
    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, common + ["--val-data", str(subset), "--classes", str(names), "--report",
                                               str(report)])
    assert result.exit_code == 0 and out.exists(), result.output
    scored = json.loads(report.read_text())
    assert scored["num_samples"] == 2 and scored["labelled"] and scored["data"]["num_class_folders"] == 2, scored
    assert names.read_text().startswith("c0\nc1")


def test_options_that_could_not_act_or_name_no_file_are_one_line(setup, tmp_path):
    quantize = ["quantize", str(setup["model"]), "--calib", str(setup["calib"]), "--num-samples", "8"]
    for seed in ("-1", str(2**32)):
        _refused(quantize + ["--seed", seed, "-o", str(tmp_path / "s.onnx")], "--seed must be an integer from 0 to")
        _refused(["synthesize", str(setup["model"]), "--seed", seed, "-o", str(tmp_path / "s.npz")], "--seed")
    long = tmp_path / ("x" * 240 + ".onnx")
    _refused(quantize + ["-o", str(long)], "file name too long")
    _refused(["synthesize", str(setup["model"]), "-o", str(tmp_path / ("x" * 240 + ".npz"))], "file name too long")
    _refused(quantize + ["-o", ""], "--output must be an .onnx file")
    _refused(["quantize", str(setup["model"]), "--calib", ""], "--calib is empty")  # was: the working folder
    _refused(["synthesize", str(setup["model"]), "-o", ""], "--output must be a .npz file")
    _refused(quantize + ["--no-validate", "--report", str(tmp_path / "r.json")], "--report is for the validation")
    _refused(quantize + ["--no-validate", "--val-data", str(setup["calib"])], "--val-data is for the validation")
    text = tmp_path / "notes.pt"
    text.write_text("my notes")
    _refused(quantize + ["--qat", "--qat-checkpoint", str(text)], "is not a checkpoint dsgonnx wrote",
             "QAT would write over it")
    _refused(quantize + ["--qat", "--qat-resume", "--qat-checkpoint", str(text)], "to resume from")
    assert text.read_text() == "my notes" and sorted(os.listdir(tmp_path)) == ["notes.pt"]
