"""`dsgonnx inspect` end to end, and every bad input: one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dsgonnx_cli.main import _COMMANDS, cli
from zoo import export_torchscript, make_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    return {
        "kept": export_torchscript(folder / "kept.onnx", keep_bn=True),
        "folded": export_torchscript(folder / "folded.onnx", keep_bn=False),
        "dynhw": export_torchscript(folder / "dynhw.onnx", keep_bn=True, dynamic_hw=True),
        "folder": folder,
    }


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def test_help_lists_commands_and_does_not_import_torch():
    code = "import sys; from dsgonnx_cli.main import main; sys.argv=['dsgonnx','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "inspect" in out and out.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_subcommand_has_help(command):
    result = _run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output


def test_inspect_json(models):
    result = _run("inspect", models["kept"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["opset"] == 13
    assert info["input"] == {"name": "input", "shape": [None, 3, 16, 16], "dtype": "float32", "layout": "NCHW"}
    assert info["num_classes"] == 10
    assert [layer["channels"] for layer in info["bn_layers"]] == [8, 16]
    assert info["bn_folded"] is False
    assert info["torch_parity"]["max_abs_diff"] < 1e-4 and info["torch_parity"]["top1_agreement"] == 1.0


def test_inspect_text_for_folded_model(models):
    result = _run("inspect", models["folded"])
    assert result.exit_code == 0, result.output
    assert "BN was likely folded" in result.output and "torch parity" in result.output


def test_inspect_dynamic_hw_with_input_shape(models):
    result = _run("inspect", models["dynhw"], "--input-shape", "1x3x20x20", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["input"]["shape"] == [None, 3, 20, 20]


@pytest.mark.parametrize("key,value,shape", [("imgsz", "[24, 20]", [None, 3, 24, 20]),  # Ultralytics' key and form
                                             ("input_size", "3x28x28", [None, 3, 28, 28]),
                                             ("image_size", "32", [None, 3, 32, 32])])
def test_dynamic_hw_is_read_from_the_model_metadata(models, tmp_path, key, value, shape):
    model = onnx.load(str(models["dynhw"]))
    entry = model.metadata_props.add()
    entry.key, entry.value = key, value
    onnx.save(model, str(tmp_path / "meta.onnx"))
    result = _run("inspect", tmp_path / "meta.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"]["shape"] == shape
    assert f"from the model's metadata ('{key}')" in result.stderr
    entry.value = "unknown"  # nothing usable: the usual request for --input-shape
    onnx.save(model, str(tmp_path / "meta.onnx"))
    result = _run("inspect", tmp_path / "meta.onnx")
    assert result.exit_code == 2 and "dynamic H/W" in result.stderr


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _bad_models(folder, kept):
    data = kept.read_bytes()
    (folder / "notes.txt").write_text("this is not a model\n")
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.onnx").write_bytes(b"")
    two = make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                     [_vi("a", TensorProto.FLOAT, [1, 3, 8, 8]), _vi("b", TensorProto.FLOAT, [1, 3, 8, 8])],
                     [_vi("y", TensorProto.FLOAT, [1])])
    onnx.save(two, str(folder / "two_inputs.onnx"))
    tokens = make_model([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
                        [_vi("ids", TensorProto.INT64, [1, 16])], [_vi("y", TensorProto.FLOAT, [1])])
    onnx.save(tokens, str(folder / "tokens.onnx"))
    flat = make_model([helper.make_node("Relu", ["x"], ["y"])],
                      [_vi("x", TensorProto.FLOAT, [1, 100])], [_vi("y", TensorProto.FLOAT, [1])])
    onnx.save(flat, str(folder / "flat.onnx"))
    hardmax = make_model([helper.make_node("Hardmax", ["x"], ["y"])],
                         [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])], [_vi("y", TensorProto.FLOAT, [1])], opset=20)
    onnx.save(hardmax, str(folder / "hardmax.onnx"))
    custom = make_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.vendor")],
                        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])], [_vi("y", TensorProto.FLOAT, [1])])
    custom.opset_import.append(helper.make_opsetid("com.vendor", 1))
    onnx.save(custom, str(folder / "custom.onnx"))
    invalid = onnx.load(str(kept))
    invalid.graph.node[0].input[0] = "does_not_exist"
    onnx.save(invalid, str(folder / "dangling.onnx"))
    for name, eps in (("negative_eps", -1.0), ("nan_eps", float("nan"))):
        model = onnx.load(str(kept))
        bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        del bn.attribute[:]
        bn.attribute.append(helper.make_attribute("epsilon", eps))
        onnx.save(model, str(folder / f"{name}.onnx"))
    model = onnx.load(str(kept))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.full(tuple(weight.dims), np.nan, np.float32), weight.name))
    onnx.save(model, str(folder / "nan_weights.onnx"))
    model = onnx.load(str(kept))
    for axis, size in ((2, 20000), (3, 20000)):
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_value = size
    onnx.save(model, str(folder / "huge_input.onnx"))
    model = onnx.load(str(kept))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight), weight.name))
    weight.raw_data += b"\x00" * 28  # 7 values more than the shape holds
    onnx.save(model, str(folder / "long_data.onnx"))
    model = onnx.load(str(kept))
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    kept_attributes = [a for a in conv.attribute if a.name != "dilations"]
    del conv.attribute[:]
    conv.attribute.extend([*kept_attributes, helper.make_attribute("dilations", [1000, 1000])])
    onnx.save(model, str(folder / "dilated.onnx"))
    model = onnx.load(str(kept))
    model.graph.node[1].name = "zzzz"
    data = model.SerializeToString()
    assert data.count(b"\x1a\x04zzzz") == 1  # field 3 (name), length 4
    (folder / "not_utf8.onnx").write_bytes(data.replace(b"\x1a\x04zzzz", b"\x1a\x04\xff\xfe\xfd\xfc"))
    # not classifiers: a map per class (was "classes 256") and class indices (was "a binary head")
    rng = np.random.default_rng(0)
    spatial = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                         [_vi("y", TensorProto.FLOAT, [1, 4, 8, 8])], [("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))])
    onnx.save(spatial, str(folder / "segmenter.onnx"))
    argmax = make_model([helper.make_node("Conv", ["x", "w"], ["s"]), helper.make_node("GlobalAveragePool", ["s"], ["p"]),
                         helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("ArgMax", ["f"], ["y"], axis=1)],
                        [_vi("x", TensorProto.FLOAT, [1, 3, 8, 8])], [_vi("y", TensorProto.INT64, [1, 1])],
                        [("w", rng.standard_normal((4, 3, 1, 1)).astype(np.float32))])
    onnx.save(argmax, str(folder / "argmax.onnx"))


BAD_INPUTS = [
    ("missing.onnx", [], "not found"),
    ("notes.txt", [], "not a valid ONNX model"),
    ("truncated.onnx", [], "not a valid ONNX model"),
    ("random.onnx", [], "not a valid ONNX model"),
    ("empty.onnx", [], "not a valid ONNX model"),
    ("two_inputs.onnx", [], "2 inputs ('a', 'b')"),
    ("tokens.onnx", [], "INT64, not a float or uint8 image tensor"),
    ("flat.onnx", [], "rank 2"),
    ("hardmax.onnx", [], "unsupported operator Hardmax-13"),  # (Gelu-20 until dsgonnx converted it)
    ("custom.onnx", [], "Frobnicate"),
    ("dangling.onnx", [], "fails the ONNX checker"),
    ("negative_eps.onnx", [], "has epsilon -1.0; it must be a finite number >= 0"),
    ("nan_eps.onnx", [], "has epsilon nan"),  # was: parity "passed", and inspect --json printed a bare NaN
    ("nan_weights.onnx", [], "holds NaN or Inf values"),  # was: parity max |diff| 0, agreement 100 %
    ("huge_input.onnx", [], "20000×20000 pixels (4.5 GiB per float32 image)"),  # was: MemoryError, exit 3
    ("not_utf8.onnx", [], "node #1 has a name, type or tensor name that is not valid UTF-8"),  # was: exit 3
    ("long_data.onnx", [], "cannot be read: cannot reshape array"),  # fp16 weights too: was exit 3
    # ONNX Runtime aborted the process on it (a C++ assertion, exit 134, no dsgonnx line)
    ("dilated.onnx", [], "a kernel, dilation, stride or padding does not fit its input"),
    ("dynhw.onnx", [], "dynamic H/W"),
    ("segmenter.onnx", [], "output 'y' is 1×4×8×8: dsgonnx quantizes classifiers"),
    ("argmax.onnx", [], "output 'y' is int64"),
    ("kept.onnx", ["--input-shape", "1x3x224"], "--input-shape must look like"),
    ("kept.onnx", ["--input-shape", "1x3x32x32"], "conflicts"),
    # a channels-last shape for a channels-first file: named as typed (was: transposed, "axis 2 ... in NCHW order")
    ("dynhw.onnx", ["--input-shape", "1x32x32x3"], "--input-shape 1x32x32x3 conflicts with input 'input' (axis 1 is fixed to 3)"),
]


@pytest.mark.parametrize("name,extra,message", BAD_INPUTS, ids=[b[0] + "".join(b[1]) for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(models, name, extra, message):
    folder = models["folder"]
    if not (folder / "notes.txt").exists():
        _bad_models(folder, models["kept"])
    result = CliRunner().invoke(cli, ["inspect", str(folder / name), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsgonnx: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_console_script_exit_code_and_stderr(models, tmp_path):
    (tmp_path / "x.onnx").write_text("garbage")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", "from dsgonnx_cli.main import main; main()", "inspect",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dsgonnx: error: ")


@pytest.mark.parametrize("args,message", [
    (["quantize", "{folder}", "--w8a8"], "is a directory"),
    (["inspect", "{folder}"], "is a directory"),
    (["quantize"], "Missing argument 'MODEL'"),
    (["quantize", "{kept}", "--wbits", "abc"], "'abc' is not a valid integer"),
    (["quantize", "{kept}", "--no-such-flag"], "No such option"),
    (["no-such-command"], "No such command"),
    (["--no-such-flag"], "No such option"),
])
def test_click_usage_errors_are_one_line_too(models, args, message):
    """click prints usage errors as usage, hint and error on three lines; dsgonnx keeps its one."""
    args = [a.format(folder=models["folder"], kept=models["kept"]) for a in args]
    result = CliRunner().invoke(cli, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dsgonnx: error: ") and message in lines[0] and "--help" in lines[0], lines[0]


def test_the_class_count_is_what_the_model_outputs_not_what_it_declares(models, tmp_path):
    model = onnx.load(str(models["kept"]))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1000  # really 10
    path = tmp_path / "declares_1000.onnx"
    onnx.save(model, str(path))
    result = _run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["num_classes"] == 10 and info["declared_num_classes"] == 1000
    assert "declared_num_classes" not in json.loads(_run("inspect", models["kept"], "--json").output)
