"""Loading, conversion and parity on the test zoo: every way a vendor exports a classifier."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from dsgonnx.errors import InputSpecError, ModelLoadError
from dsgonnx.graph.bn_taps import bn_folded, find_bn_layers
from dsgonnx.graph.onnx_io import load_model, parse_input_shape
from dsgonnx.graph.to_torch import check_parity, run_onnxruntime, run_torch, to_torch
from zoo import (
    export_dynamo,
    export_torchscript,
    reference_logits,
    tiny_net,
    with_constant_weights,
    with_external_data,
)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def bn_kept(zoo_dir):
    return export_torchscript(zoo_dir / "kept.onnx", keep_bn=True)


def _images(n=3, size=16, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _convert_and_compare(path, input_shape=None, expected_bn=2):
    loaded = load_model(path, input_shape)
    model = to_torch(loaded)
    assert not model.module.training, "onnx2torch returns train mode; dsgonnx must put it in eval"
    parity = check_parity(model)
    # far inside check_parity's own tolerance (which it raises at): float32 graphs match ORT closely
    assert parity.max_abs_diff < 1e-4 and parity.top1_agreement == 1.0
    # beyond ORT: the converted graph computes what the original torch network computes
    images = _images(size=loaded.input.shape[2])
    np.testing.assert_allclose(run_torch(model, images)[0], reference_logits(images), atol=1e-4, rtol=1e-4)
    assert len(find_bn_layers(model)) == expected_bn
    return loaded, model, parity


@pytest.mark.parametrize("opset", [11, 13, 17, 20])
def test_torchscript_bn_kept_converts_and_matches(zoo_dir, opset):
    path = export_torchscript(zoo_dir / f"ts{opset}.onnx", keep_bn=True, opset=opset)
    loaded, _, _ = _convert_and_compare(path)
    assert loaded.opset == opset
    assert loaded.input.shape == (None, 3, 16, 16) and loaded.num_classes == 10
    assert not bn_folded(loaded.model)


def test_folded_export_is_reported_as_bn_folded(zoo_dir):
    path = export_torchscript(zoo_dir / "folded.onnx", keep_bn=False)
    loaded, _, _ = _convert_and_compare(path, expected_bn=0)
    assert "BatchNormalization" not in loaded.op_histogram
    assert bn_folded(loaded.model)


@pytest.mark.parametrize("opset", [18, 20, 23])
def test_dynamo_export_converts(zoo_dir, opset):
    path = export_dynamo(zoo_dir / f"dynamo{opset}.onnx", opset=opset)
    loaded, _, _ = _convert_and_compare(path)
    assert loaded.opset == opset
    ops = loaded.op_histogram
    assert ops.get("BatchNormalization") == 2 and "ReduceMean" in ops  # ReduceMean-18: axes as input
    reshape_attrs = [a for n in loaded.model.graph.node if n.op_type == "Reshape" for a in n.attribute]
    assert any(a.name == "allowzero" and a.i == 1 for a in reshape_attrs)


def test_dynamo_default_export_folds_bn(zoo_dir):
    path = export_dynamo(zoo_dir / "dynamo_folded.onnx", opset=18, keep_bn=False)
    loaded, _, _ = _convert_and_compare(path, expected_bn=0)
    assert bn_folded(loaded.model)


def test_weights_in_constant_nodes(zoo_dir, bn_kept):
    path = with_constant_weights(bn_kept, zoo_dir / "constants.onnx")
    assert not onnx.load(str(path)).graph.initializer
    _, model, _ = _convert_and_compare(path)
    # Constant-held BN parameters still become real BatchNorm modules with their statistics
    net = tiny_net()
    layers = find_bn_layers(model)
    np.testing.assert_allclose(layers[0].running_mean, net.bn1.running_mean.numpy())
    np.testing.assert_allclose(layers[1].running_var, net.bn2.running_var.numpy())


def test_external_data(zoo_dir, bn_kept):
    folder = zoo_dir / "external"
    folder.mkdir()
    path = with_external_data(bn_kept, folder / "model.onnx")
    assert (folder / "weights.bin").stat().st_size > 1000
    loaded, _, _ = _convert_and_compare(path)
    assert loaded.has_external_data


def test_external_data_outside_model_folder_is_refused(zoo_dir, bn_kept):
    inner = zoo_dir / "escape" / "inner"
    inner.mkdir(parents=True)
    path = with_external_data(bn_kept, inner / "model.onnx", location="w.bin")
    model = onnx.load(str(path), load_external_data=False)
    (zoo_dir / "escape" / "w.bin").write_bytes((inner / "w.bin").read_bytes())
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


def test_dynamic_height_width_needs_input_shape(zoo_dir):
    path = export_torchscript(zoo_dir / "dynhw.onnx", keep_bn=True, dynamic_hw=True)
    with pytest.raises(InputSpecError, match=r"dynamic H/W.*`input_shape`"):
        load_model(path)
    loaded, _, _ = _convert_and_compare(path, input_shape=(1, 3, 24, 24))
    assert loaded.input.shape == (None, 3, 24, 24)


def test_input_shape_must_agree_with_static_dims(bn_kept):
    with pytest.raises(InputSpecError, match="conflicts"):
        load_model(bn_kept, (1, 3, 32, 32))


@pytest.mark.parametrize("text", ["1x3x224", "ax3x2x2", "1x3x0x4", ""])
def test_parse_input_shape_rejects_bad_text(text):
    with pytest.raises(InputSpecError):
        parse_input_shape(text)


def test_parity_check_catches_a_wrong_conversion(bn_kept):
    loaded = load_model(bn_kept)
    model = to_torch(loaded)
    # break the torch twin the way a buggy converter would (wrong epsilon / statistics)
    bn = model.submodule(find_bn_layers(model)[1].name)
    bn.running_var.mul_(4.0)
    from dsgonnx.errors import ParityError

    with pytest.raises(ParityError, match="output 'logits' differs"):
        check_parity(model)


def test_torch_and_onnxruntime_runs_agree_batch_by_batch(bn_kept):
    loaded = load_model(bn_kept)
    images = _images(n=5)
    np.testing.assert_allclose(
        run_torch(to_torch(loaded), images, batch=2)[0], run_onnxruntime(loaded, images)[0], atol=1e-4
    )


def test_a_file_newer_than_onnxruntime_reads_is_worked_on_at_the_newest_ir_it_does(bn_kept, tmp_path):
    """onnx's ``helper.make_model`` writes onnx's own newest IR version, which the installed
    ONNX Runtime may not read yet (onnx 1.23 writes 14, ORT 1.31 reads up to 13): `inspect`
    stopped with ORT's 'Unsupported model IR version', and `quantize` got as far as
    calibration, where ORT's tools open their own session, and stopped with an internal error.
    The graph is worked on at the newest IR version ORT reads; the file itself is untouched."""
    import onnxruntime as ort

    from dsgonnx import QuantConfig, inspect, quantize
    from dsgonnx.runtime import max_ir_version
    from dsgonnx.validation.core import validate

    readable = max_ir_version()
    if readable + 1 > onnx.IR_VERSION:
        pytest.skip(f"this onnx writes no IR version newer than ONNX Runtime reads ({readable})")
    model = onnx.load(str(bn_kept))
    model.ir_version = readable + 1
    path = tmp_path / "newer.onnx"
    onnx.save(model, str(path))
    written = path.read_bytes()
    with pytest.raises(Exception, match="IR version"):  # what every stage met before
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    info = inspect(str(path))
    assert (info["ir_version"], info["ir_version_read_as"]) == (readable + 1, readable)
    assert info["torch_parity"]["top1_agreement"] == 1.0
    done = quantize(str(path), QuantConfig(wbits=8, abits=8, num_samples=4, output=str(tmp_path / "q.onnx"),
                                           validate=False))
    assert onnx.load(str(done.output)).ir_version == readable
    assert done.decisions["ir_version"].startswith(f"{readable}: the file's {readable + 1} is newer")
    # validate opens the user's file itself: its session reads the graph at the lowered version
    report = validate(str(path), str(done.output), images=_images(8)).to_dict()
    assert report["agreement"] >= 0.75 and report["sqnr_db"] > 20, report
    assert path.read_bytes() == written


def test_an_opset_newer_than_onnxruntime_runs_is_refused_at_load(tmp_path):
    """onnx's newest opset can be one still under development, which ONNX Runtime refuses to
    load: `quantize` synthesized its images and then stopped at calibration (where ORT's tools
    open their own session) with an internal error. Refused at load, in one line."""
    from dsgonnx import QuantConfig, quantize
    from dsgonnx.runtime import max_opset

    newest = max_opset()
    if newest + 1 > onnx.defs.onnx_opset_version():
        pytest.skip(f"this onnx has no opset newer than ONNX Runtime runs ({newest})")
    from onnx import TensorProto, helper

    from zoo import make_model

    rng = np.random.default_rng(0)
    model = make_model(  # (ops whose schemas hold at any opset: the checker passes it)
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))], opset=newest + 1)
    path = tmp_path / "newest.onnx"
    onnx.save(model, str(path))
    message = f"opset {newest + 1} is newer than ONNX Runtime"
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)
    with pytest.raises(ModelLoadError, match=message):
        quantize(str(path), QuantConfig(wbits=8, abits=8, num_samples=4, output=str(tmp_path / "q.onnx"),
                                        validate=False))
    assert not (tmp_path / "q.onnx").exists()


def test_a_session_on_a_private_copy_names_the_users_file(tmp_path):
    """dsgonnx reads a model once and runs private copies of it (in a temporary folder): ORT's
    refusal to load one named that copy, twice (dsgonnx's prefix and ORT's own message)."""
    from dsgonnx.runtime import ort_session

    copy = tmp_path / "dsgonnx-model-x" / "net.onnx"
    copy.parent.mkdir()
    copy.write_bytes(b"\x08\x07" + b"\xff" * 64)  # (an IR version field, then bytes ORT cannot parse)
    with pytest.raises(ModelLoadError) as refused:
        ort_session(copy, shown_as="models/net.onnx")
    message = str(refused.value)
    assert message.startswith("cannot load ONNX model models/net.onnx: ") and str(copy) not in message, message
