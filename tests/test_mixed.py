"""--mixed auto: the noisiest tensors stay on the 8-bit grid, within the budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import dsgonnx
from dsgonnx import DataError, QuantConfig
from dsgonnx_cli.main import cli
from zoo import export_tiny_resnet


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", images=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    return {"folder": folder, "model": export_tiny_resnet(folder / "res.onnx")}


def _weight_integers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {node.input[0][: -len("_quantized")]: inits[node.input[0]] for node in model.graph.node
            if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8}


def test_kept_weights_use_the_8_bit_grid_the_rest_6_bits_within_budget(setup):
    config = QuantConfig(wbits=6, abits=6, calib=str(setup["folder"] / "calib.npz"), num_samples=32, validate=False,
                         mixed=True, mixed_budget=0.3, bias_correction="off", first_layer_8bit=False)
    result = dsgonnx.quantize(setup["model"], config, output=str(setup["folder"] / "mixed.onnx"))
    mixed = result.decisions["mixed"]
    kept = {row["tensor"] for row in mixed["weights_8bit"]}
    assert kept and 0 < mixed["weight_share_8bit"] <= 0.3
    ints = _weight_integers(result.output)
    sizes = {name: values.size for name, values in ints.items()}
    assert sum(sizes[name] for name in kept) / sum(sizes.values()) == pytest.approx(mixed["weight_share_8bit"], abs=1e-3)
    for name, values in ints.items():
        top = int(np.abs(values).max())
        assert (top > 31) if name in kept else (top <= 31), (name, top)  # 8-bit grid ±127 vs 6-bit ±31
    # the kept tensors are the ones adding the most noise per value: none left out is noisier
    assert mixed["noise_share_kept"] > 0
    plain = dsgonnx.quantize(setup["model"], config, mixed=False, output=str(setup["folder"] / "plain.onnx"))
    assert "mixed" not in plain.decisions


def test_bad_budget_and_native_widths_are_refused(setup):
    with pytest.raises(DataError, match="`mixed_budget`"):
        QuantConfig(mixed=True, mixed_budget=1.5)
    result = CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--w6a6", "--mixed", "auto",
                                      "--mixed-budget", "0", "--calib", "gaussian"])
    assert result.exit_code == 2 and "--mixed-budget is a share of the weights" in result.stderr, result.stderr
    result = CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--w8a8", "--mixed", "auto", "--calib",
                                      str(setup["folder"] / "calib.npz"), "--num-samples", "32", "--no-validate",
                                      "-o", str(setup["folder"] / "w8.onnx")])
    assert result.exit_code == 2 and "mixed precision keeps tensors at 8 bits among simulated" in result.stderr
    assert not (setup["folder"] / "w8.onnx").exists()


def test_the_first_layer_kept_at_8_bits_counts_against_the_budget(setup):
    config = QuantConfig(wbits=6, abits=6, calib=str(setup["folder"] / "calib.npz"), num_samples=32, validate=False,
                         mixed=True, mixed_budget=0.3, bias_correction="off")
    result = dsgonnx.quantize(setup["model"], config, output=str(setup["folder"] / "mixed-first.onnx"))
    first, mixed = result.decisions["first_layer_8bit"], result.decisions["mixed"]
    first_weight = next(name for name in first["tensors"] if name.endswith("weight"))
    ints = _weight_integers(result.output)
    sizes = {name: values.size for name, values in ints.items()}
    eight = {name for name, values in ints.items() if int(np.abs(values).max()) > 31}  # on the 8-bit grid
    assert first_weight in eight and len(eight) > 1  # the first layer and at least one chosen weight
    share = sum(sizes[name] for name in eight) / sum(sizes.values())
    assert share <= 0.3 and share == pytest.approx(mixed["weight_share_8bit"], abs=1e-3)
    assert eight == {row["tensor"] for row in mixed["weights_8bit"]}
