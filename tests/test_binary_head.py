"""One-output (binary) heads: a logit or a sigmoid probability per sample.

Scored as two classes — the decision is logit > 0 / probability > 0.5 — so agreement means
the same decision and accuracy is binary accuracy; synthesis with cross-entropy draws 0/1
labels for the one output.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from dsgonnx import SynthConfig, inspect, synthesize
from dsgonnx.validation.metrics import compare_outputs
from dsgonnx_cli.main import cli
from zoo import export_tiny_binary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("binary")
    return {"folder": folder, "logit": export_tiny_binary(folder / "logit.onnx"),
            "sigmoid": export_tiny_binary(folder / "sigmoid.onnx", sigmoid=True)}


def test_binary_metrics_score_the_decision():
    fp = np.array([[2.0], [-1.0], [0.5], [-3.0]], dtype=np.float32)
    q = np.array([[1.5], [0.2], [0.4], [-2.0]], dtype=np.float32)  # the second sample flips
    labels = np.array([1, 0, 0, 0])
    m = compare_outputs(fp, q, labels)
    assert (m.num_classes, m.output_kind) == (2, "binary logit")
    assert m.agreement == 0.75 and m.fp_top1 == 75.0 and m.q_top1 == 50.0 and m.fp_top5 is None
    sigmoid = lambda z: 1 / (1 + np.exp(-z.astype(np.float64)))  # noqa: E731
    p, r = sigmoid(fp[:, 0]), sigmoid(q[:, 0])
    bernoulli = np.mean(p * np.log(p / r) + (1 - p) * np.log((1 - p) / (1 - r)))
    assert m.kl == pytest.approx(bernoulli, rel=1e-6)
    assert m.sqnr_db == pytest.approx(10 * np.log10(np.sum(fp**2) / np.sum((fp - q) ** 2)))
    probabilities = compare_outputs(sigmoid(fp).astype(np.float32), sigmoid(q).astype(np.float32), labels)
    assert probabilities.output_kind == "binary probability" and probabilities.agreement == 0.75
    assert probabilities.kl == pytest.approx(bernoulli, rel=1e-4)


@pytest.mark.parametrize("kind", ["logit", "sigmoid"])
def test_binary_models_run_inspect_synthesize_quantize_validate(models, kind):
    folder, runner = models["folder"], CliRunner()
    info = inspect(models[kind])
    assert info["num_classes"] == 1 and info["head"] == "binary (one output)"
    # cross-entropy to random 0/1 labels on the one output, BCE on logits or on the sigmoid
    synthetic = synthesize(models[kind], SynthConfig(method="dsg", num_samples=48, iters=30, ce_weight=1.0, seed=0),
                           holdout=0)
    plain = synthesize(models[kind], SynthConfig(method="dsg", num_samples=48, iters=30, seed=0), holdout=0)
    assert np.isfinite(synthetic.images).all() and np.abs(synthetic.images - plain.images).max() > 1e-3
    scores = ort.InferenceSession(str(models[kind]), providers=["CPUExecutionProvider"]).run(
        None, {"input": synthetic.images})[0][:, 0]
    decided = scores > (0.5 if kind == "sigmoid" else 0.0)
    assert 0 < decided.sum() < len(decided)  # both decisions occur among the images
    npz = folder / f"{kind}.npz"
    labels = decided.astype(np.int64)
    labels[:8] = 1 - labels[:8]  # 8 of 48 wrong for the FP32 model: binary accuracy 83.33 %
    np.savez(npz, images=synthetic.images, labels=labels)
    out = folder / f"{kind}.w8a8.onnx"
    result = runner.invoke(cli, ["quantize", str(models[kind]), "--w8a8", "--calib", str(npz), "--num-samples", "48",
                                 "-o", str(out), "--quiet", "--no-validate"])
    assert result.exit_code == 0, result.output
    report = folder / f"{kind}.json"
    result = runner.invoke(cli, ["validate", str(models[kind]), str(out), "--data", str(npz), "--report", str(report),
                                 "--min-agreement", "0.9"])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["num_classes"] == 2 and figures["output_kind"] == f"binary {'probability' if kind == 'sigmoid' else 'logit'}"
    assert figures["fp32"]["top1"] == pytest.approx(100 * 40 / 48)
    assert figures["agreement"] >= 0.9
