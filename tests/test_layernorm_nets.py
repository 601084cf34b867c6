"""A network normalised by LayerNorm (a vision transformer in miniature) through the whole
path: no BN statistics, so synthesis picks a BN-free source; reconstruction converts the
pre-processed graph, whose node names ORT's optimiser extends, and refines its Conv/Gemm
layers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from dsgonnx import QuantConfig, RefineConfig, SynthConfig, inspect, quantize, synthesize
from dsgonnx.errors import NoBatchNormError, UnsupportedModelError
from zoo import export_tiny_convnext, export_tiny_vit


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return export_tiny_vit(tmp_path_factory.mktemp("vit") / "vit.onnx")


def test_a_layernorm_network_is_not_taken_for_a_folded_one(vit):
    info = inspect(str(vit))
    assert info["bn_count"] == 0 and info["other_norms"] == ["LayerNormalization"]
    assert info["bn_folded"] is False  # (its patch embedding is a Conv with a bias, as a folded model's)
    assert info["torch_parity"]["top1_agreement"] == 1.0
    with pytest.raises(NoBatchNormError, match="normalises with LayerNormalization") as refused:
        synthesize(str(vit), SynthConfig(method="dsg", num_samples=2, iters=1))
    assert "export the model with BN kept" not in str(refused.value)


def test_w4a4_reconstruction_of_a_vit(vit, tmp_path):
    """Before, the reconstruction's torch conversion of the pre-processed graph lost a node
    ('value ... is used before it is computed'): ORT's optimiser had added a node 'Gather'
    beside the exporter's '/Gather' and '/Gather_1'."""
    done = quantize(str(vit), QuantConfig(wbits=4, abits=4, num_samples=8, output=str(tmp_path / "q.onnx"),
                                          refine=RefineConfig(iters=4, batch_size=4), validate=False))
    assert done.refine["refined_layers"] == ["/patch/Conv", *[f"/encoder/layers.{i}/self_attn/Gemm" for i in (0, 1)]]
    # (a MatMul's weight is rounded plainly: not refined, and its value in the simulation float)
    assert sum("MatMul weights are not refined" in s["why"] for s in done.refine["skipped_layers"]) == 6
    # what ORT quantizes beside the refined layers, the simulation leaves float, and the report says so
    # (it said nothing): each MatMul's weight, each LayerNormalization's scale and bias, the bias Adds'
    # constants, GELU's 0.5 and 1 (the weights' INT4 in ORT's file); the Conv's and Gemms' are simulated
    left = done.refine["unsimulated"]
    assert sum(s.startswith("input 1 of") and s.endswith("/MatMul") for s in left) == 6
    assert sum(s.endswith("/LayerNormalization") for s in left) == 2 * 5
    assert not any(s.endswith(("/Conv", "/Gemm")) for s in left) and len(left) == 27, left
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(done.output), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_a_fixed_batch_is_worked_on_through_a_twin_that_takes_any(tmp_path):
    """Exported without dynamic axes (batch 1), a ConvNeXt's MLP is fused by ORT's
    pre-processing into Gemms between Reshapes to [batch·H·W, C]; reconstruction's batches of
    4 stopped with "shape '[16, 16]' is invalid". The batch is checked not to matter inside,
    the model worked on through a twin that takes any, and the file written fixes it again.
    A ViT whose class token is expanded to the traced batch keeps its fixed batch."""
    from dsgonnx.graph.onnx_io import load_model, quantizable

    path = export_tiny_convnext(tmp_path / "convnext.onnx", batch=1)
    done = quantize(str(path), QuantConfig(wbits=4, abits=4, num_samples=8, output=str(tmp_path / "q.onnx"),
                                           refine=RefineConfig(iters=2, batch_size=4), validate=False))
    assert done.decisions["input_batch"].startswith("1, as the file fixes it")
    written = onnx.load(str(done.output)).graph.input[0]
    assert [d.dim_value for d in written.type.tensor_type.shape.dim] == [1, 3, 16, 16]
    image = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(done.output), providers=["CPUExecutionProvider"]).run(None, {"input": image})[0]
    assert logits.shape == (1, 10) and np.isfinite(logits).all()

    vit = load_model(export_tiny_vit(tmp_path / "vit1.onnx", batch=1))
    assert quantizable(vit, any_batch_twin=True) is vit
    # ... and its reconstruction, which stopped with an internal error, is refused before any work
    with pytest.raises(UnsupportedModelError, match="fixes its batch at 1 inside.*dynamic batch axis"):
        quantize(str(tmp_path / "vit1.onnx"), QuantConfig(wbits=4, abits=4, num_samples=8, output=str(tmp_path / "v.onnx"),
                                                         refine=RefineConfig(iters=2, batch_size=4), validate=False))
    assert not (tmp_path / "v.onnx").exists()
    convnext = load_model(path)
    assert quantizable(convnext) is convnext  # (without reconstruction or QAT: the file as it is)
