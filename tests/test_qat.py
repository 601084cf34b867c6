"""Quantization-aware training (``--qat``) on a tiny residual net with synthetic data.

Training lowers the distillation loss on held-out synthetic samples, the QDQ model holds
exactly the trained integers, steps and biases (the trained simulation is the written
model), an interrupted run resumes to the same model as an uninterrupted one, and bad
settings end in one line.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from dsgonnx import QatConfig, QuantConfig, RefineConfig, Rounding, quantize
from dsgonnx.config import AUTO_FEATURE_WEIGHT
from dsgonnx.errors import DataError
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.hardware import tunable_malloc
from dsgonnx.quant.placement import read_placement
from dsgonnx.synth import SynthConfig, synthesize
from dsgonnx_cli.main import cli
from zoo import export_tiny_mobile, export_tiny_resnet


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qat")
    model = export_tiny_resnet(folder / "res.onnx")
    synthetic = synthesize(load_model(model), SynthConfig(method="dsg", num_samples=96, iters=40, seed=0))
    np.savez(folder / "calib.npz", images=synthetic.images[:64])
    np.savez(folder / "held.npz", images=synthetic.images[64:])
    return {"folder": folder, "model": model, "npz": folder / "calib.npz", "held": synthetic.images[64:]}


def _quantize(setup, name, qat, **options):
    # the trained model is what these tests read (the choice against plain rounding: test_fallback.py)
    common = dict(wbits=4, abits=4, calib=str(setup["npz"]), num_samples=64, force=True, validate=False, seed=0,
                  fallback=False)
    return quantize(str(setup["model"]), QuantConfig(output=str(setup["folder"] / f"{name}.onnx"), qat=qat,
                                                     **(common | options)))


def _initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _against_fp32(model, quantized, images):
    """(top-1 agreement, mean squared logit difference) of ``quantized`` with ``model`` on ``images``."""
    import onnxruntime as ort

    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": images})[0]

    reference, logits = run(model), run(quantized)
    return float((reference.argmax(1) == logits.argmax(1)).mean()), float(((reference - logits) ** 2).mean())


def test_training_lowers_the_distillation_loss_and_the_file_is_the_trained_model(setup):
    result = _quantize(setup, "trained", QatConfig(iters=150, batch_size=32, lr=1e-3, augment=False))
    report = result.refine
    assert report["method"] == "qat" and report["steps"] == 150 and report["stopped"] == "done"
    assert report["freed_memory_kept"] is (tunable_malloc() is not None)  # (glibc's malloc, left alone)
    assert report["distillation_after"] < 0.9 * report["distillation_before"], report
    # every grid of the QDQ model was learned: each activation step moved from its calibrated value by
    # far more than float32 rounding (at QAT's step rate of 1e-4 a step whose gradient changes sign
    # moves by ~1e-4 in 150 steps: on one CPU 4 of 9 moved by over 1e-3, on another 5), some by 1e-3
    steps = report["learned_activation_steps"]
    moves = sorted(abs(s["learned"] / s["calibrated"] - 1) for s in steps.values())
    assert steps and moves[0] > 1e-5 and moves[-1] > 1e-3, moves
    written = read_placement(onnx.load(str(result.output))).activations
    for name, step in steps.items():
        assert written[name].scale == pytest.approx(step["learned"], rel=1e-6)
    # the weights are exactly the trained integers on the trained steps, which moved too
    inits = _initializers(result.output)
    moved = 0
    for name, weight in result.refined_weights.items():
        np.testing.assert_array_equal(inits[f"{name}_quantized"].astype(np.int64), weight.integers)
        np.testing.assert_array_equal(inits[f"{name}_scale"], weight.scales)
    untrained = _quantize(setup, "untrained", QatConfig(iters=0), holdout=0)
    for name, weight in result.refined_weights.items():
        moved += int(not np.array_equal(weight.scales, untrained.refined_weights[name].scales))
    assert moved == len(result.refined_weights)
    # on synthetic samples it never saw, the trained model's logits are far closer to FP32's than the
    # untrained one's, and it agrees with FP32's top-1 as often, to one sample of the 32: float sums in
    # another order move one (the LSQ chain on 1 thread 25 of 32, on 2 and 3 threads 26, as untrained)
    trained, start = (_against_fp32(setup["model"], path, setup["held"]) for path in (result.output, untrained.output))
    assert trained[1] < 0.7 * start[1] and trained[0] >= start[0] - 1 / len(setup["held"]), (trained, start)
    decided = json.loads({p.key: p.value for p in onnx.load(str(result.output)).metadata_props}["dsgonnx.decisions"])
    assert decided["qat"]["method"] == "qat" and decided["qat"]["layers"] == len(result.refined_weights)
    # the simulation it trained is the written model (float rounding order aside)
    assert decided["qat"]["fidelity"]["agreement"] >= 0.9 and decided["qat"]["fidelity"]["sqnr_db"] >= 25, decided


def test_a_squant_start_holds_squants_integers_on_the_students_grid_bias_corrected(setup, monkeypatch):
    from dsgonnx.quant.correct import conv_shift
    from dsgonnx.quant import rounding
    from dsgonnx.refine import qat as qat_module

    seen = []
    original = rounding.squant_integers

    def recording(weight, scales, low, high):
        seen.append((weight, scales, original(weight, scales, low, high), high))
        return seen[-1][2]

    monkeypatch.setattr(rounding, "squant_integers", recording)
    biases = {}  # per run: weight name -> the layer's float bias as trained (here: as it starts)
    export = qat_module._export

    def recording_export(layers, *args, **kwargs):
        biases[len(biases)] = {layer.weight_name: layer.module.inner.bias.detach().double().numpy().copy()
                               for layer in layers}
        return export(layers, *args, **kwargs)

    monkeypatch.setattr(qat_module, "_export", recording_export)
    nearest = _quantize(setup, "start-nearest", QatConfig(iters=0, start="nearest"), holdout=0)
    assert not seen and nearest.refine["start"] == {"rounding": "nearest"}
    # auto starts where quantize without --qat is: SQuant's rounding at 4 bits (nearest at 8, below)
    squant = _quantize(setup, "start-squant", QatConfig(iters=0), holdout=0)
    names = list(squant.refined_weights)
    assert squant.refine["start"]["rounding"] == "squant" and len(seen) == len(names)
    flipped = 0
    for name, (weight, scales, integers, top) in zip(names, seen):
        start, plain = squant.refined_weights[name], nearest.refined_weights[name]
        # the same grid, the nearest integers of the same float weight, and SQuant's flips of them written
        np.testing.assert_array_equal(start.scales, plain.scales)
        np.testing.assert_allclose(scales, plain.scales, rtol=1e-6)
        # the first layer stays at 8 bits (ORT's reduced grid, ±64, on a CPU without VNNI)
        assert top == ((64 if squant.bits["reduce_range"] else 127) if name == names[0] else 7)
        np.testing.assert_array_equal(np.clip(np.rint(weight / scales.reshape(-1, *[1] * (weight.ndim - 1))), -top, top),
                                      plain.integers)
        np.testing.assert_array_equal(start.integers, integers)
        assert np.abs(start.integers - plain.integers).max() <= 1
        flipped += int((start.integers != plain.integers).sum())
    assert flipped == squant.refine["start"]["rounded_other_way"] > 0
    # bias correction measures the start's shift against the float weight: on the first layer, which
    # reads the images, the two starts' biases differ by exactly (q_squant - q_nearest)·s·E[x]
    first = names[0]
    weight, scales, integers, _ = seen[0]
    delta = (integers - nearest.refined_weights[first].integers) * scales.reshape(-1, 1, 1, 1)
    mean = np.load(setup["npz"])["images"].astype(np.float64).mean(axis=(0, 2, 3))
    expected = -conv_shift(delta, mean, mean.size // delta.shape[1])
    assert np.abs(expected).max() > 1e-5
    np.testing.assert_allclose(biases[1][first] - biases[0][first], expected, rtol=1e-3, atol=1e-7)
    eight = _quantize(setup, "start-8bit", QatConfig(iters=0), holdout=0, wbits=8, abits=8)
    assert eight.refine["start"] == {"rounding": "nearest"} and len(seen) == len(names)
    # the library's qat_model takes only a resolved start; QatConfig.resolved maps auto as refine's does
    with pytest.raises(ValueError, match="QatConfig.resolved"):
        qat_module.qat_model(setup["model"], setup["folder"] / "unresolved.onnx", None, None, None, exclude=set(),
                             per_channel=True, weight_top=7, config=QatConfig())
    for plain, start in ((Rounding.SQUANT, "squant"), (Rounding.NEAREST, "nearest")):
        assert QatConfig().resolved(plain, False).start == RefineConfig().resolved(plain).start == start
    assert QatConfig(start="refine").resolved(Rounding.SQUANT, False).start == "refine"


def test_a_refine_start_holds_the_reconstructions_integers_and_steps_and_trains_from_them(setup):
    from dsgonnx import RefineConfig

    # activation steps learned too; the bias correction applied after it, as in the reconstruction
    # QAT starts from (QAT trains the biases itself)
    refine = RefineConfig(iters=40, batch_size=32, act_lr=1e-3, correct_inside=False)
    refined = quantize(str(setup["model"]), QuantConfig(
        wbits=4, abits=4, calib=str(setup["npz"]), num_samples=64, force=True, validate=False, seed=0, fallback=False,
        holdout=0, output=str(setup["folder"] / "reconstructed.onnx"), refine=refine))
    start = _quantize(setup, "start-refine", QatConfig(iters=0, start="refine"), holdout=0, refine=refine)
    # QAT's model before any step is the reconstruction's: the same integers on the same weight steps
    assert set(start.refined_weights) == set(refined.refined_weights)
    for name, weight in refined.refined_weights.items():
        np.testing.assert_array_equal(start.refined_weights[name].integers, weight.integers)
        # (to float rounding: QAT learns the step as its log)
        np.testing.assert_allclose(start.refined_weights[name].scales, weight.scales, rtol=1e-6)
    # (reconstruction moved integers off nearest rounding, so this is not nearest rounding's start)
    assert sum(unit["rounded_other_way"] for unit in refined.refine["units"]) > 0
    # and the activation steps reconstruction learned, written as QAT's
    learned = refined.refine["learned_activation_steps"]
    assert learned and sum(abs(s["learned"] / s["calibrated"] - 1) > 1e-3 for s in learned.values()) > 0
    for name, step in start.refine["learned_activation_steps"].items():
        assert step["learned"] == pytest.approx(learned[name]["learned"], rel=1e-5)
    summary = start.refine["start"]
    assert summary["rounding"] == "refine" and summary["reconstruction"]["method"] == "brecq"
    assert summary["reconstruction"]["config"]["iters"] == 40
    assert summary["reconstruction"]["layers"] == len(refined.refined_weights)
    assert summary["reconstruction"]["activation_steps"] == len(learned)
    assert summary["reconstruction"]["loss_after"] < summary["reconstruction"]["loss_before"]
    # training moves on from there: the held-out distillation loss falls below the start's
    trained = _quantize(setup, "from-refine", QatConfig(iters=100, batch_size=32, lr=1e-3, augment=False, start="refine"),
                        refine=refine)
    assert trained.refine["distillation_after"] < trained.refine["distillation_before"], trained.refine
    assert any(not np.array_equal(trained.refined_weights[n].integers, w.integers) for n, w in refined.refined_weights.items())


def test_an_interrupted_run_resumes_to_the_uninterrupted_model(setup, monkeypatch):
    from dsgonnx.refine import qat as qat_module

    straight = _quantize(setup, "straight", QatConfig(iters=40, batch_size=16))
    checkpoint = setup["folder"] / "run.ckpt"
    calls = {"n": 0}
    original = qat_module.distillation

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 26:  # step 26 of 40, after the checkpoint of step 20 (the held-out loss took 1 call)
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(qat_module, "distillation", interrupted)
    config = QatConfig(iters=40, batch_size=16, checkpoint=str(checkpoint), checkpoint_every=10)
    with pytest.raises(KeyboardInterrupt):
        _quantize(setup, "resumed", config)
    monkeypatch.setattr(qat_module, "distillation", original)
    assert checkpoint.exists() and not (setup["folder"] / "resumed.onnx").exists()  # nothing half-written
    assert not list(setup["folder"].glob(".resumed.onnx*"))
    resumed = _quantize(setup, "resumed", QatConfig(iters=40, batch_size=16, checkpoint=str(checkpoint),
                                                    checkpoint_every=10, resume=True))
    assert resumed.refine["resumed_from"] == 20 and resumed.refine["steps"] == 40
    for name, weight in straight.refined_weights.items():
        np.testing.assert_array_equal(weight.integers, resumed.refined_weights[name].integers)
        np.testing.assert_array_equal(weight.scales, resumed.refined_weights[name].scales)
    a, b = _initializers(straight.output), _initializers(resumed.output)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a checkpoint of another run is refused, in one line
    with pytest.raises(DataError, match="made for another model, data or settings"):
        _quantize(setup, "other", QatConfig(iters=50, batch_size=16, checkpoint=str(checkpoint), resume=True))


def test_time_budget_stops_training_exports_it_and_a_resume_continues(setup):
    checkpoint = setup["folder"] / "budget.ckpt"
    config = QatConfig(iters=100000, batch_size=16, time_budget=1.0, checkpoint=str(checkpoint))
    result = _quantize(setup, "budget", config)
    steps = result.refine["steps"]
    assert result.refine["stopped"] == "time budget" and 0 < steps < 100000
    assert result.output.exists()
    again = _quantize(setup, "budget", QatConfig(iters=100000, batch_size=16, time_budget=1.0,
                                                 checkpoint=str(checkpoint), resume=True))
    assert again.refine["resumed_from"] == steps and again.refine["steps"] > steps


def test_a_diverging_run_stops_with_the_loss_named(setup, monkeypatch):
    from dsgonnx.refine import qat as qat_module

    calls = {"n": 0}
    original = qat_module.distillation

    def diverging(*args, **kwargs):  # the loss of the third training step is not a number
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(qat_module, "distillation", diverging)
    with pytest.raises(DataError, match=r"distillation loss \(mean squared difference from the float model's logits\) became nan at step 3"):
        _quantize(setup, "nan", QatConfig(iters=20, batch_size=16))
    assert not (setup["folder"] / "nan.onnx").exists()


def test_kl_rewards_a_noisy_student_for_flattening_its_logits_far_more_than_mse():
    # why QAT's default loss is the squared difference: a student that is the teacher plus
    # noise (a 4-bit model) lowers KL most by shrinking its logits to a fraction of the
    # teacher's, i.e. by being unsure rather than right; the squared difference wants them close
    import torch

    from dsgonnx.refine.qat import distillation

    generator = torch.Generator().manual_seed(0)
    teacher = 6 * torch.randn(512, 10, generator=generator)
    student = teacher + 4 * torch.randn(512, 10, generator=generator)
    agreement = float((student.argmax(1) == teacher.argmax(1)).float().mean())
    assert 0.5 < agreement < 0.8, agreement
    scales = torch.linspace(0.05, 1.5, 59)

    def best(loss):
        return float(scales[torch.tensor([float(distillation(student * a, teacher, 1.0, loss)) for a in scales]).argmin()])

    kl, mse = best("kl"), best("mse")
    assert kl < 0.5 * mse and mse > 0.6, (kl, mse)
    assert float(distillation(teacher, teacher, 1.0, "mse")) == 0.0


def test_feature_distillation_trains_every_layers_output_towards_the_float_models(setup, monkeypatch):
    from dsgonnx.refine import qat as qat_module

    calls = []
    original = qat_module.FeatureTaps.loss

    def recording(taps):
        assert set(taps.student) == set(taps.teacher) and taps.teacher
        shapes = [(taps.student[i].shape, taps.teacher[i].shape) for i in taps.teacher]
        assert all(s == t for s, t in shapes), shapes
        assert all(taps.student[i].requires_grad and not taps.teacher[i].requires_grad for i in taps.teacher)
        value = original(taps)
        calls.append((len(shapes), shapes[0][0][0], float(value.detach())))
        return value

    monkeypatch.setattr(qat_module.FeatureTaps, "loss", recording)
    result = _quantize(setup, "features", QatConfig(iters=40, batch_size=32, lr=1e-3, augment=False, feature_weight=100))
    assert result.refine["config"]["feature_weight"] == 100
    layers = len(result.refined_weights)
    assert len(calls) == 40 and all(n == layers and batch == 32 for n, batch, _ in calls)
    weighted = np.mean([c[2] for c in calls[-10:]])
    calls.clear()  # the same run with the term all but off: the layers' outputs end further from the float model's
    _quantize(setup, "features-off", QatConfig(iters=40, batch_size=32, lr=1e-3, augment=False, feature_weight=1e-9))
    unweighted = np.mean([c[2] for c in calls[-10:]])
    assert 0 < weighted < 0.8 * unweighted, (weighted, unweighted)
    # with a generator's images in the batch, the teacher's layers are read on the whole batch
    calls.clear()
    _quantize(setup, "features-mixed", QatConfig(iters=2, batch_size=16, data="mixed", generator_warmup=0,
                                                 feature_weight=1))
    assert [(n, batch) for n, batch, _ in calls] == [(layers, 16)] * 2
    with pytest.raises(DataError, match="feature_weight"):
        QatConfig(feature_weight=-1)
    # the default (auto): on with the weight measured on the ResNets, off on a network with a depthwise convolution
    resnet = _quantize(setup, "features-auto", QatConfig(iters=0), holdout=0)
    assert resnet.refine["config"]["feature_weight"] == AUTO_FEATURE_WEIGHT > 0
    mobile = quantize(str(export_tiny_mobile(setup["folder"] / "mobile.onnx")),
                      QuantConfig(output=str(setup["folder"] / "features-mobile.onnx"), qat=QatConfig(iters=0), wbits=4,
                                  abits=4, calib=str(setup["npz"]), num_samples=64, force=True, validate=False,
                                  fallback=False, holdout=0))
    assert mobile.refine["config"]["feature_weight"] == 0


def test_mixing_blends_half_the_batch_with_a_partner_and_is_seeded():
    from dsgonnx.refine.qat import mix

    n, h, w = 400, 12, 10
    images = torch.randn(n, 3, h, w)
    assert mix(images, torch.Generator().manual_seed(0), "none") is images
    for how in ("mixup", "cutmix"):
        out = mix(images, torch.Generator().manual_seed(1), how)
        assert torch.equal(out, mix(images, torch.Generator().manual_seed(1), how))
        changed = ~torch.isclose(out, images).flatten(1).all(1)
        assert 0.4 < float(changed.float().mean()) < 0.6, how  # each image with probability 1/2
        for i in torch.nonzero(changed).flatten()[:30].tolist():  # each a blend with some other image
            assert any(_blend_of(out[i], images[i], images[j], how) for j in range(n) if j != i), (how, i)
    # cutmix pastes one rectangle of the partner, every pixel all-or-nothing across channels
    out = mix(images, torch.Generator().manual_seed(2), "cutmix")
    for i in range(20):
        moved = ~torch.isclose(out[i], images[i]).all(0)
        if moved.any():
            rows, cols = torch.nonzero(moved.any(1)).flatten(), torch.nonzero(moved.any(0)).flatten()
            assert moved[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def _blend_of(out, image, other, how) -> bool:
    """Whether ``out`` is ``image`` blended with ``other``: a weighted sum with one weight in
    [0, 1] (mixup), or each pixel (all channels) from one of the two (cutmix)."""
    if how == "mixup":
        diff = (other - image).flatten()
        weight = float(((out - image).flatten() @ diff) / (diff @ diff))
        return -1e-4 <= weight <= 1 + 1e-4 and torch.allclose(image + weight * (other - image), out, atol=1e-5)
    from_other = torch.isclose(out, other).all(0)
    return bool((from_other | torch.isclose(out, image).all(0)).all() and from_other.any())


def test_config_and_cli_reject_bad_settings_in_one_line(setup):
    with pytest.raises(DataError, match="`qat.lr` must be positive"):
        QatConfig(lr=0)
    with pytest.raises(DataError, match="`qat.resume` needs `qat.checkpoint`"):
        QatConfig(resume=True)
    with pytest.raises(DataError, match="choose one"):
        QuantConfig(qat=QatConfig(), refine="brecq")
    assert QuantConfig(qat=QatConfig(start="refine"), refine="adaround").refine.method.value == "adaround"
    runner = CliRunner()
    out = setup["folder"] / "cli.onnx"
    good = runner.invoke(cli, ["quantize", str(setup["model"]), "--w4a4", "--calib", str(setup["npz"]), "--num-samples",
                               "64", "-o", str(out), "--force", "--no-validate", "--quiet", "--qat", "--qat-iters", "5",
                               "--qat-batch-size", "16", "--qat-no-augment", "--qat-mix", "cutmix",
                               "--qat-start", "refine", "--refine-iters", "5"])
    assert good.exit_code == 0, good.output
    summary = json.loads(good.stdout)
    assert summary["qat"]["steps"] == 5 and summary["qat"]["config"]["augment"] is False
    assert summary["qat"]["config"]["mix"] == "cutmix" and summary["qat"]["config"]["start"] == "refine"
    assert summary["qat"]["start"]["reconstruction"]["config"]["iters"] == 5
    with pytest.raises(DataError, match="`qat.mix` must be one of none, mixup, cutmix"):
        QatConfig(mix="blend")
    for args, message in ((["--qat-iters", "5"], "need --qat"),
                          (["--qat", "--refine", "brecq"], "give one"),
                          (["--qat", "--refine-iters", "5"], "need --refine adaround|brecq (or --qat --qat-start refine)"),
                          (["--qat", "--qat-lr", "-1"], "--qat-lr must be positive"),
                          (["--qat", "--qat-resume"], "--qat-resume needs --qat-checkpoint")):
        bad = runner.invoke(cli, ["quantize", str(setup["model"]), "-o", str(setup["folder"] / "bad.onnx"),
                                  "--calib", str(setup["npz"]), "--num-samples", "64", *args])
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not (setup["folder"] / "bad.onnx").exists()


def test_a_batch_whose_training_step_would_not_fit_is_refused_in_one_line_before_training(setup, monkeypatch):
    """QAT's batch is sized against the memory available before any image is made or trained on:
    QAT_ACTIVATION_COPIES times one image's activations (every leaf module's output) per image of
    the batch, within MEMORY_SHARE of what the machine has; just short of it ends in one line,
    nothing written, and just enough trains."""
    import dsgonnx.refine.qat as qat
    from dsgonnx.graph.to_torch import to_torch
    from dsgonnx.hardware import MEMORY_SHARE
    from dsgonnx.synth.generator import activation_bytes

    loaded = load_model(setup["model"])
    per_image = activation_bytes(to_torch(loaded).module.float().eval(), loaded.input.chw, torch.device("cpu"),
                                 torch.contiguous_format)
    need = qat.QAT_ACTIVATION_COPIES * per_image * 32  # (64 calibration images: the batch is the 32 asked for)
    monkeypatch.setattr(qat, "memory_on", lambda device: int(need / MEMORY_SHARE) - 1024)
    with pytest.raises(DataError, match=r"qat: a batch of 32 images of \S+ needs about .* lower `qat.batch_size`"):
        _quantize(setup, "too_big", QatConfig(iters=5, batch_size=32))
    assert not (setup["folder"] / "too_big.onnx").exists()
    bad = CliRunner().invoke(cli, ["quantize", str(setup["model"]), "--w4a4", "--calib", str(setup["npz"]),
                                   "--num-samples", "64", "-o", str(setup["folder"] / "too_big.onnx"), "--qat",
                                   "--qat-iters", "5", "--qat-batch-size", "32", "--quiet"])
    assert bad.exit_code != 0 and "--qat-batch-size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, \
        bad.stderr
    assert "Traceback" not in bad.output and not (setup["folder"] / "too_big.onnx").exists()
    monkeypatch.setattr(qat, "memory_on", lambda device: int(need / MEMORY_SHARE) + 2**20)
    assert _quantize(setup, "fits", QatConfig(iters=5, batch_size=32)).refine["steps"] == 5


def test_the_generators_step_is_counted_where_qat_trains_on_its_images(setup, monkeypatch):
    """With qat.data generator the batch is all made, however few calibration images there are,
    and the generator's step (the model's activations and the generator's own, ACTIVATION_COPIES
    times) outweighs the training step; with mixed, half is made and the two steps add up to the
    larger and half the smaller. Just short of either ends in the one line naming the generator."""
    import dsgonnx.refine.qat as qat
    from dsgonnx.graph.to_torch import to_torch
    from dsgonnx.hardware import MEMORY_SHARE
    from dsgonnx.synth.generative import generator_saved_bytes
    from dsgonnx.synth.generator import ACTIVATION_COPIES, activation_bytes

    loaded = load_model(setup["model"])
    chw, cpu = loaded.input.chw, torch.device("cpu")
    per_image = activation_bytes(to_torch(loaded).module.float().eval(), chw, cpu, torch.contiguous_format)
    own = generator_saved_bytes(chw, cpu)
    assert own > 0 and generator_saved_bytes(chw[:1] + tuple(2 * side for side in chw[1:]), cpu) > 3 * own
    training = qat.QAT_ACTIVATION_COPIES * per_image * 64
    made = ACTIVATION_COPIES * (per_image + own) * 64
    assert made > training  # (the generator's step is the larger: the need below is its alone)
    mixed = max(training, made / 2) + min(training, made / 2) / 2
    # (generator: 16 calibration images, where they alone would make a batch of 16)
    for data, need, samples in (("generator", made, 16), ("mixed", mixed, 64)):
        config = QatConfig(iters=2, batch_size=64, data=data, generator_warmup=0)
        monkeypatch.setattr(qat, "memory_on", lambda device: int(need / MEMORY_SHARE) - 1024)
        with pytest.raises(DataError, match=rf"qat: a batch of 64 images of \S+, {64 if data == 'generator' else 32} "
                                            "of them from the generator .* lower `qat.batch_size`"):
            _quantize(setup, f"too_big_{data}", config, num_samples=samples)
        assert not (setup["folder"] / f"too_big_{data}.onnx").exists()
        monkeypatch.setattr(qat, "memory_on", lambda device: int(need / MEMORY_SHARE) + 2**20)
        assert _quantize(setup, f"fits_{data}", config, num_samples=samples).refine["steps"] == 2
