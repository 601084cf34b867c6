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