"""SQuant's data-free rounding (``--rounding squant``): the flips keep each kernel's and each
output channel's summed rounding error within half a step, every integer stays within one
step of its weight, and the QDQ model holds exactly those integers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dsgonnx import QuantConfig, RefineConfig, quantize
from dsgonnx.errors import DataError
from dsgonnx.quant.qdq import pre_process, quantized_weights
from dsgonnx.quant.rounding import squant_integers
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet


def _errors(weight, scales, integers):
    exact = weight / scales.reshape(-1, *[1] * (weight.ndim - 1))
    return integers - exact, exact


@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (16, 1, 3, 3), (10, 48), (12, 8, 1, 1)])
@pytest.mark.parametrize("top", [7, 31, 127])
def test_flips_bound_the_summed_errors_of_kernels_and_channels(shape, top):
    rng = np.random.default_rng(sum(shape) + top)
    weight = rng.standard_t(4, size=shape)  # heavy tails, as trained weights have
    scales = np.abs(weight.reshape(shape[0], -1)).max(axis=1) / top
    integers = squant_integers(weight, scales, -top, top)
    error, exact = _errors(weight, scales, integers)
    nearest_error = np.rint(exact) - exact
    assert integers.dtype == np.int64 and np.abs(integers).max() <= top
    assert (np.abs(error) < 1).all()  # each integer is the floor or the ceiling of its weight
    kernels = error.reshape(shape[0], shape[1] if len(shape) > 2 else 1, -1).sum(axis=2)
    channels = kernels.sum(axis=1)
    assert np.abs(channels).max() <= 0.5 + 1e-9
    # the kernel term: within ±0.5, but for the kernels that took one more flip for their channel
    assert np.abs(kernels).max() <= 1.5 + 1e-9 and np.mean(np.abs(kernels) <= 0.5 + 1e-9) > 0.5
    near_channels = nearest_error.reshape(shape[0], -1).sum(axis=1)
    assert np.abs(near_channels).max() > 0.5  # nearest rounding leaves channels summed errors to fix
    # and it costs little per element: the mean squared error stays far below the floor/ceil worst case
    assert np.mean(error ** 2) < np.mean(nearest_error ** 2) + 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rounding")
    return {"folder": folder, "model": export_tiny_resnet(folder / "res.onnx")}


def _written_integers(path) -> dict:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {name[: -len("_quantized")]: value.astype(np.int64) for name, value in inits.items()
            if name.endswith("_quantized")}


@pytest.mark.parametrize("bits", [8, 4])
def test_the_qdq_model_holds_squants_integers(tiny, bits):
    folder = tiny["folder"]
    common = dict(wbits=bits, abits=bits, calib="gaussian", num_samples=32, force=True, validate=False, seed=0)
    squant = quantize(str(tiny["model"]), QuantConfig(output=str(folder / f"sq{bits}.onnx"), rounding="squant",
                                                      fallback=False, **common))
    plain = quantize(str(tiny["model"]), QuantConfig(output=str(folder / f"near{bits}.onnx"), rounding="nearest",
                                                     **common))
    prepared = onnx.load(str(pre_process(tiny["model"], folder / "prepared.onnx")))
    floats = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in prepared.graph.initializer}
    written, nearest = _written_integers(squant.output), _written_integers(plain.output)
    first = set(squant.decisions.get("first_layer_8bit", {}).get("tensors", []))
    report = squant.refine
    assert report["method"] == "squant" and squant.decisions["rounding"]["layers"] == report["weights"] > 0
    differs = 0
    for site in quantized_weights(prepared):
        name = site.weight
        if name not in squant.refined_weights:  # the final layer stays float (logits excluded)
            continue
        # ORT's INT4 range is [-8, 7]; its reduced INT8 range (CPUs without VNNI) [-64, 64]
        eight = (-64, 64) if squant.bits["reduce_range"] else (-127, 127)
        low, high = eight if bits == 8 or name in first else (-8, 7)
        scales = np.abs(floats[name]).reshape(len(floats[name]), -1).max(axis=1) * 2 / (high - low)
        expected = squant_integers(floats[name], scales.astype(np.float32), low, high)
        np.testing.assert_array_equal(written[name], expected, err_msg=name)
        np.testing.assert_array_equal(squant.refined_weights[name].integers, expected)
        exact = floats[name] / scales.astype(np.float32).astype(np.float64).reshape(-1, *[1] * (floats[name].ndim - 1))
        differs += int((written[name] != np.clip(np.rint(exact), low, high)).sum())  # nearest on the same grid
    assert differs == report["rounded_other_way"] > 0
    # SQuant's grid is ORT's own: the plain model holds the nearest integers on it (ORT divides
    # in float32, so a weight within float32's error of a rounding boundary may go the other way)
    against_ort = sum(int((written[n] != nearest[n]).sum()) for n in squant.refined_weights)
    assert abs(against_ort - differs) <= max(2, differs // 100), (against_ort, differs)


def test_rounding_is_checked_against_plain_and_refused_with_refine(tiny):
    runner = CliRunner()
    out = tiny["folder"] / "cli.onnx"
    result = runner.invoke(cli, ["quantize", str(tiny["model"]), "--w4a4", "--calib", "gaussian", "--num-samples", "32",
                                 "-o", str(out), "--force", "--no-validate", "--quiet", "--rounding", "squant"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    check = summary["decisions"]["rounding"]["against_plain"]
    assert check["on"] == "held-out synthetic samples" and check["kept"] in ("learned", "plain")
    # the choice follows the comparison recorded: SQuant's model against nearest rounding on each probe
    (step,) = check["steps"]
    assert step["candidate"] == "learned" and step["against"] == "plain"
    assert check["kept"] == ("learned" if step["replaced"] else "plain")
    for where, figures in (("held-out synthetic samples", check), ("procedural images", check["procedural"])):
        difference = figures["learned"]["sqnr_db"] - figures["plain"]["sqnr_db"]
        assert step["probes"][where]["db"] == pytest.approx(difference, abs=2e-3)
    assert summary["rounding"]["method"] == "squant"
    bad = runner.invoke(cli, ["quantize", str(tiny["model"]), "-o", str(tiny["folder"] / "bad.onnx"), "--rounding",
                              "squant", "--refine", "brecq"])
    assert bad.exit_code == 2 and "choose one" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tiny["folder"] / "bad.onnx").exists()
    with pytest.raises(DataError, match="`rounding` squant"):
        QuantConfig(rounding="squant", refine=RefineConfig())
    with pytest.raises(DataError, match="rounding"):
        QuantConfig(rounding="stochastic")
    # auto: SQuant for weights of 4 bits or fewer that nothing learns, else nearest rounding
    assert QuantConfig(wbits=4, abits=8).weight_rounding().value == "squant"
    assert QuantConfig(wbits=6, abits=6).weight_rounding().value == "nearest"
    assert QuantConfig(wbits=4, abits=4, refine="brecq").weight_rounding().value == "nearest"
