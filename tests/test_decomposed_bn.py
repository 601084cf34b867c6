"""BatchNorm written as elementwise ops: what the pattern carries is recovered and used.

Sub(μ)·Div(√(σ²+ε)) keeps mean and variance (synthesis then matches what it does on the BN
model); Sub(μ)·Mul(s) keeps the mean only (the std term is dropped); Mul·Add alone is an
affine layer without statistics (the BN-free path). Before quantization every such chain
after a Conv is folded into it, as ORT folds BN nodes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from dsgonnx import SynthConfig, inspect, synthesize
from dsgonnx.graph.bn_taps import BNProbe, find_bn_layers
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.graph.to_torch import to_torch
from dsgonnx.quant.qdq import pre_process
from dsgonnx.synth.losses import bn_alignment
from dsgonnx_cli.main import cli
from zoo import decompose_bn, export_tiny_resnet


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("decomposed")
    bn = export_tiny_resnet(folder / "bn.onnx")
    return {"folder": folder, "bn": bn, **{style: decompose_bn(bn, folder / f"{style}.onnx", style)
                                           for style in ("full", "mean", "affine")}}


def test_inspect_names_what_each_pattern_carries(models):
    reference = inspect(models["bn"])["bn_layers"]
    for style, kind in (("full", "decomposed"), ("mean", "decomposed-mean")):
        info = inspect(models[style])
        assert info["bn_count"] == 6 and {layer["kind"] for layer in info["bn_layers"]} == {kind}
        assert [layer["channels"] for layer in info["bn_layers"]] == [layer["channels"] for layer in reference]
        assert info["torch_parity"]["top1_agreement"] == 1.0 and not info["bn_folded"]
    affine = inspect(models["affine"])
    assert affine["bn_count"] == 0 and affine["op_histogram"]["Mul"] == 6


def test_full_pattern_synthesizes_as_the_bn_model_does(models):
    config = SynthConfig(method="dsg", num_samples=16, iters=20, seed=0)
    with_bn, decomposed = synthesize(models["bn"], config, holdout=0), synthesize(models["full"], config, holdout=0)
    assert np.abs(with_bn.images - decomposed.images).max() < 0.05  # the same targets, float order aside


def test_an_unknown_variance_drops_the_std_term_without_nan_gradients():
    mean = torch.randn(4, 3, requires_grad=True)
    std = torch.rand(4, 3, requires_grad=True)
    target_mean, target_std = torch.zeros(3), torch.tensor([1.0, float("nan"), 2.0])
    loss = bn_alignment(mean, std, target_mean, target_std, torch.zeros(1), torch.tensor(float("nan")))
    expected = (mean**2).sum(1) + (std[:, 0] - 1) ** 2 + (std[:, 2] - 2) ** 2
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert torch.isfinite(std.grad).all() and (std.grad[:, 1] == 0).all()


def test_mean_only_layers_pull_the_means_towards_their_targets(models):
    torch_model = to_torch(load_model(models["mean"]))
    layers = find_bn_layers(torch_model)
    assert all(not layer.has_variance for layer in layers)

    def gap(images):  # Σ over layers ‖batch mean of the layer input − μ‖²
        means = {}
        with BNProbe(torch_model, layers, lambda layer, x: means.__setitem__(layer.name, x.mean((0, 2, 3)).numpy())):
            with torch.no_grad():
                torch_model(torch.from_numpy(images))
        return sum(float(np.sum((means[layer.name] - layer.running_mean) ** 2)) for layer in layers)

    def run(method, iters=None):
        return synthesize(models["mean"], SynthConfig(method=method, num_samples=16, iters=iters, seed=0), holdout=0)

    short, long = run("zeroq", 1), run("zeroq", 100)
    assert all(np.isfinite(v) for v in long.meta["final_layer_losses"].values())
    assert sum(long.meta["final_layer_losses"].values()) < 0.85 * sum(short.meta["final_layer_losses"].values())
    assert gap(long.images) < 0.85 * gap(run("gaussian").images)


@pytest.mark.parametrize("style", ["full", "mean"])
def test_decomposed_models_quantize_from_their_own_statistics(models, style):
    out = models["folder"] / f"{style}.w8a8.onnx"
    report = models["folder"] / f"{style}.json"
    result = CliRunner().invoke(cli, ["quantize", str(models[style]), "--w8a8", "--num-samples", "32", "--iters", "30",
                                      "-o", str(out), "--report", str(report), "--min-agreement", "0.8", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["agreement"] >= 0.8


def test_the_affine_pattern_takes_the_bn_free_path(models):
    refused = CliRunner().invoke(cli, ["quantize", str(models["affine"]), "--w8a8", "--calib", "dsg", "-o",
                                       str(models["folder"] / "affine.dsg.onnx"), "--quiet"])
    assert refused.exit_code == 2 and "no BatchNormalization" in refused.stderr
    assert not (models["folder"] / "affine.dsg.onnx").exists()
    report = models["folder"] / "affine.json"
    result = CliRunner().invoke(cli, ["quantize", str(models["affine"]), "--w8a8", "--num-samples", "16", "-o",
                                      str(models["folder"] / "affine.q.onnx"), "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["calibration"]["method"] == "procedural"


@pytest.mark.parametrize("style", ["full", "mean", "affine"])
def test_pre_processing_folds_the_elementwise_ops_into_the_conv(models, style, tmp_path):
    """Decomposed BN is folded into the Conv before quantization, as a BN node would be (ORT's
    optimiser folds BN nodes only): the same graph as the BN model's, the same outputs."""
    prepared = onnx.load(str(pre_process(models[style], tmp_path / "prepared.onnx")))
    reference = onnx.load(str(pre_process(models["bn"], tmp_path / "bn.onnx")))
    ops = sorted(n.op_type for n in prepared.graph.node)
    assert ops == sorted(n.op_type for n in reference.graph.node)  # Conv 6, Add 2 (the joins), Relu 5, ...
    images = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)

    def run(model):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": images})[0]

    np.testing.assert_allclose(run(prepared), run(onnx.load(str(models[style]))), rtol=1e-4, atol=1e-4)
