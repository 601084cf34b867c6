"""A network normalised by LayerNorm (a vision transformer in miniature) through the whole
path: no BN statistics, so synthesis picks a BN-free source; reconstruction converts the
pre-processed graph, whose node names ORT's optimiser extends, and refines its Conv/Gemm
layers against a simulation that holds every other constant ORT quantizes."""

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
    # the MatMuls by a weight matrix (the encoder's nn.Linear layers on tokens) are refined too; they
    # were rounded plainly, 6 of the 9 weights
    layers = ["/patch/Conv"]
    for i in (0, 1):
        layers += [f"/encoder/layers.{i}/{name}" for name in ("self_attn/MatMul", "self_attn/Gemm", "linear1/MatMul",
                                                              "linear2/MatMul")]
    assert done.refine["refined_layers"] == layers
    assert [s["layer"] for s in done.refine["skipped_layers"]] == ["/head/Gemm"]  # (excluded: kept float)
    # what ORT quantizes beside the refined layers — each LayerNormalization's scale and bias, the bias
    # Adds' constants, GELU's 0.5 and 1 — the simulation holds on their exported values (it left them
    # float: about 10 dB from the written file), and a bias Add does not end a block (it did once its
    # constant was read through a quantizer, and the blocks cut attention)
    assert done.refine["unsimulated"] == []
    assert [len(unit["layers"]) for unit in done.refine["units"]] == [3, 2, 2, 2]
    assert done.refine["fidelity"]["agreement"] == 1 and done.refine["fidelity"]["sqnr_db"] > 40, done.refine["fidelity"]
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    logits = ort.InferenceSession(str(done.output), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_learned_activation_steps_move_the_int32_biases_they_scale(vit, tmp_path):
    """ORT writes a LayerNormalization's bias as int32 on its input's step times its scale's: a
    learned input step moves that grid. The simulation rounds the bias on the step it learns, as
    the file does; held on the calibrated grid, the trained ViT W4A4 was 12.9 dB from the file."""
    from dsgonnx.quant.placement import read_placement

    done = quantize(str(vit), QuantConfig(wbits=4, abits=4, num_samples=8, output=str(tmp_path / "q.onnx"),
                                          refine=RefineConfig(iters=20, batch_size=4, act_lr=0.05), validate=False))
    steps = done.refine["learned_activation_steps"]
    placement = read_placement(onnx.load(str(done.output)))
    norms = [(node, index) for node, index in placement.constants if node.endswith("/LayerNormalization") and index == 2]
    assert len(norms) == 5 and all(placement.constants[key].low == np.iinfo(np.int32).min for key in norms)
    moved = [name for name, step in steps.items() if abs(step["learned"] / step["calibrated"] - 1) > 0.01]
    assert moved, steps
    assert done.refine["fidelity"]["sqnr_db"] > 40, done.refine["fidelity"]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("net", ["vit", "convnext"])
def test_the_simulation_of_a_transformer_is_its_exported_model(net, bits, vit, tmp_path):
    """simulate_qdq reads every constant ORT quantizes — the MatMuls' weights, LayerNormalization's
    scale and bias, the bias Adds' and GELU's constants — on its exported values: nothing is left
    float (27 inputs of the ViT were), and the logits follow ONNX Runtime's well above the
    quantization's own noise."""
    from dsgonnx.quant.qdq import pre_process
    from dsgonnx.refine.simulate import fidelity, simulate_qdq
    from dsgonnx.validation.metrics import sqnr_db

    path = vit if net == "vit" else export_tiny_convnext(tmp_path / "convnext.onnx")
    out = tmp_path / "q.onnx"
    quantize(str(path), QuantConfig(wbits=bits, abits=bits, num_samples=8, output=str(out), validate=False))
    sim = simulate_qdq(pre_process(path, tmp_path / "prepared.onnx"), out)
    assert sim.unsimulated == []
    model = onnx.load(str(out))
    kinds = {n.name: n.op_type for n in model.graph.node}
    read = {kinds.get(name) for name, _ in sim.placement.constants}
    # (the ConvNeXt's MLP is fused into Gemms at its fixed batch: no MatMul)
    assert {"LayerNormalization", "Add", "Mul"} | ({"MatMul"} if net == "vit" else set()) <= read, read
    batch = 1 if net == "convnext" else 8
    images = np.random.default_rng(1).standard_normal((batch, 3, 16, 16)).astype(np.float32)
    exported = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    floats = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]
    figures, floor = fidelity(sim(images), exported), sqnr_db(floats, exported)
    assert figures["sqnr_db"] >= floor + 5, (figures, floor)


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


def test_a_matmul_weight_gets_its_channel_axis_at_simulated_widths(vit, tmp_path):
    """At W6 (simulated in 8-bit containers by explicit scales) each MatMul weight is quantized per
    output column, as ORT does itself at W8 and W4 (axis 1); the explicit scales made it one scale
    for the tensor."""
    from onnx import numpy_helper

    out = tmp_path / "q.onnx"
    quantize(str(vit), QuantConfig(wbits=6, abits=6, num_samples=8, output=str(out), validate=False))
    model = onnx.load(str(out))
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in producers
               and producers[n.input[1]].op_type == "DequantizeLinear"
               and producers[n.input[1]].input[0] in initializers]
    assert len(matmuls) == 6
    for node in matmuls:
        dequantize = producers[node.input[1]]
        integers, scales = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
        assert {a.name: a.i for a in dequantize.attribute}.get("axis") == 1, node.name
        assert scales.shape == (integers.shape[1],) and np.abs(integers).max() <= 31, node.name
