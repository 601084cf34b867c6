"""Synthesis end to end on tiny BN models: optimisation works, is reproducible, and the
papers' diversity claim holds; bad cases fail cleanly."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from dsgonnx.artifacts import SyntheticSet
from dsgonnx.errors import DataError, NoBatchNormError
from dsgonnx.preprocess import PRESETS
from dsgonnx.synth import SynthConfig, SynthesisError, synthesize
from dsgonnx_cli.main import cli
from zoo import export_torchscript


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return {
        "kept": export_torchscript(folder / "kept.onnx", keep_bn=True),
        "folded": export_torchscript(folder / "folded.onnx", keep_bn=False),
        "folder": folder,
    }


def _run(model, **settings):
    settings.setdefault("num_samples", 8)
    return synthesize(str(model), SynthConfig(**settings))


def _total(result):
    return sum(result.meta["final_layer_losses"].values())


@pytest.mark.parametrize("method", ["zeroq", "dsg"])
def test_optimisation_lowers_the_bn_loss(models, method):
    start = _run(models["kept"], method=method, iters=0)
    end = _run(models["kept"], method=method, iters=40)
    assert np.array_equal(start.images.shape, end.images.shape)
    assert _total(end) < 0.5 * _total(start)
    assert np.isfinite(end.images).all()


def test_same_seed_same_images_other_seed_other_images(models):
    first = _run(models["kept"], iters=10, seed=3)
    again = _run(models["kept"], iters=10, seed=3)
    other = _run(models["kept"], iters=10, seed=4)
    np.testing.assert_array_equal(first.images, again.images)
    assert not np.allclose(first.images, other.images)


def test_images_stay_inside_the_pixel_box(models):
    recipe = PRESETS["imagenet"]
    result = _run(models["kept"], iters=20, lr=0.5, preprocess=recipe)
    low = (0 - np.array(recipe.mean)) / np.array(recipe.std)
    high = (1 - np.array(recipe.mean)) / np.array(recipe.std)
    per_channel = result.images.transpose(1, 0, 2, 3).reshape(3, -1)
    assert (per_channel.min(1) >= low - 1e-6).all() and (per_channel.max(1) <= high + 1e-6).all()
    # the box is really used: some pixels sit on its faces
    assert np.isclose(per_channel.min(1), low, atol=1e-5).any() or np.isclose(per_channel.max(1), high, atol=1e-5).any()
    assert result.meta["pixel_box"]["low"] == pytest.approx(list(low), rel=1e-5)


def test_gaussian_is_standard_normal_without_optimisation(models):
    result = _run(models["folded"], method="gaussian", num_samples=64)
    assert abs(result.images.mean()) < 0.05 and abs(result.images.std() - 1) < 0.05
    assert result.meta["seconds_per_iter"] is None


def test_dsg_samples_are_more_diverse_than_zeroq(models):
    """The papers' claim, with equal iterations, seed and pixel box."""
    settings = dict(iters=60, num_samples=16, seed=0, preprocess=PRESETS["imagenet"])
    zeroq = _run(models["kept"], method="zeroq", **settings)
    dsg = _run(models["kept"], method="dsg", **settings)
    assert dsg.meta["diversity"]["sample_similarity"] < zeroq.meta["diversity"]["sample_similarity"]


def test_batch_alignment_matches_the_set_and_leaves_samples_free(models):
    """alignment batch: the pooled BN loss falls as the per-sample one does under ZeroQ/DSG,
    and the samples' own statistics spread wider around the targets than per-sample
    alignment leaves them."""
    settings = dict(iters=40, num_samples=16, seed=0, preprocess=PRESETS["imagenet"])
    start = _run(models["kept"], alignment="batch", **dict(settings, iters=0))
    batch = _run(models["kept"], alignment="batch", **settings)
    sample = _run(models["kept"], **settings)
    assert batch.meta["config"]["alignment"] == "batch"
    assert _total(batch) < 0.5 * _total(start)
    assert batch.meta["diversity"]["stat_spread"] > 1.5 * sample.meta["diversity"]["stat_spread"]


def _rescaled(src, dst, factor: float):
    """``src`` with its first Conv's output ``factor``× larger and the BN after it rescaled to
    match: the same function, one layer's activations on another scale."""
    model = onnx.load(str(src))
    weights = {init.name: init for init in model.graph.initializer}
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization" and node.input[0] == conv.output[0])
    for name, by in ((conv.input[1], factor), (bn.input[3], factor), (bn.input[4], factor * factor)):
        weights[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights[name]) * np.float32(by), name))
    onnx.save(model, str(dst))
    return dst


def test_normalized_gaps_do_not_depend_on_a_layers_scale(models):
    """With ``normalize_gaps`` a layer whose activations are 8× larger (same function) pulls
    the images no harder: the same images; with the papers' absolute gaps, other images.
    (ZeroQ's loss: DSG's SCI, an eigendecomposition, grows last-bit differences over the steps.)"""
    twin = _rescaled(models["kept"], models["folder"] / "rescaled.onnx", 8.0)
    normalized = [_run(m, method="zeroq", iters=30, seed=1, normalize_gaps=True) for m in (models["kept"], twin)]
    absolute = [_run(m, method="zeroq", iters=30, seed=1).images for m in (models["kept"], twin)]
    apart = np.abs(normalized[0].images - normalized[1].images).max()
    assert apart < 1e-3
    assert np.abs(absolute[0] - absolute[1]).max() > 0.5
    # the recorded per-layer losses are in those units too
    np.testing.assert_allclose(list(normalized[1].meta["final_layer_losses"].values()),
                               list(normalized[0].meta["final_layer_losses"].values()), rtol=1e-3, atol=1e-6)


def test_meta_records_the_run(models, tmp_path):
    result = _run(models["kept"], iters=5, num_samples=6, batch_size=4)
    meta = result.meta
    assert meta["method"] == "dsg" and meta["config"]["iters"] == 5 and meta["batch_size"] == 4
    assert meta["num_bn_layers"] == 2 and len(meta["final_layer_losses"]) == 2
    assert len(meta["model"]["sha256"]) == 64 and meta["seconds"] > 0
    assert set(meta["diversity"]) == {"sample_similarity", "stat_spread", "stat_offset"}
    path = result.save(tmp_path / "set.npz")
    loaded = SyntheticSet.load(path)
    np.testing.assert_array_equal(loaded.images, result.images)
    assert loaded.meta == json.loads(json.dumps(meta))


@pytest.mark.parametrize("method", ["dsg", "zeroq"])
def test_folded_model_is_refused_for_bn_methods_asked_for(models, method):
    with pytest.raises(NoBatchNormError, match="`method` auto .picks a BN-free source., procedural or inversion"):
        _run(models["folded"], method=method, iters=1)


def test_nan_guard_names_the_loss_term(models, tmp_path):
    """A model whose BN input is sqrt(x) produces NaN statistics for negative inputs."""
    model = onnx.load(str(models["kept"]))
    first_bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    model.graph.node.insert(list(model.graph.node).index(first_bn),
                            helper.make_node("Sqrt", [first_bn.input[0]], ["sqrt_out"], name="sqrt"))
    first_bn.input[0] = "sqrt_out"
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SynthesisError, match="loss term 'bn' became nan at iteration 0"):
        _run(path, method="zeroq", iters=3)


def test_cli_writes_npz_and_preview_and_refuses_to_overwrite(models):
    out = models["folder"] / "cli.npz"
    preview = models["folder"] / "grid.png"
    args = ["synthesize", str(models["kept"]), "-o", str(out), "--iters", "3", "--num-samples", "4",
            "--preprocess", "imagenet", "--preview", str(preview), "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == [4, 3, 16, 16] and summary["holdout"] == 16  # made beside them, kept apart
    assert SyntheticSet.load(out).holdout.shape == (16, 3, 16, 16)
    assert SyntheticSet.load(out).meta["config"]["preprocess"]["preset"] == "imagenet"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert SyntheticSet.load(out).meta["config"]["normalize_gaps"] is False  # the papers' absolute gaps
    normalized = CliRunner().invoke(cli, args[:3] + [str(models["folder"] / "norm.npz")] + args[4:8] + ["--normalize-gaps"])
    assert normalized.exit_code == 0, normalized.output
    assert SyntheticSet.load(models["folder"] / "norm.npz").meta["config"]["normalize_gaps"] is True


def test_cli_folded_model_with_method_dsg_exits_2(models):
    result = CliRunner().invoke(cli, ["synthesize", str(models["folded"]), "-o",
                                      str(models["folder"] / "x.npz"), "--iters", "1", "--method", "dsg"])
    assert result.exit_code == 2
    assert "carries no BatchNorm statistics" in result.stderr and "--method auto" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (models["folder"] / "x.npz").exists()


def test_resolution_schedule_starts_small_and_ends_at_full_size(models, monkeypatch):
    import dsgonnx.synth.generator as generator

    phases = []
    iterate = generator._Run._iterate

    def spy(self, source, tap, margins, label, first, iters):  # each phase: image size, iterations
        phases.append((tuple(source().shape[2:]), iters))
        return iterate(self, source, tap, margins, label, first, iters)

    monkeypatch.setattr(generator._Run, "_iterate", spy)
    result = _run(models["kept"], method="zeroq", iters=12, low_res=8, low_res_share=0.5,
                  preprocess=PRESETS["imagenet"])
    assert phases == [((8, 8), 6), ((16, 16), 6)]  # half the iterations at 8 px, then the rest at 16 px
    assert result.images.shape == (8, 3, 16, 16)
    assert np.isfinite(result.images).all()
    full = _run(models["kept"], method="zeroq", iters=0, preprocess=PRESETS["imagenet"])
    assert _total(result) < _total(full)
    # a schedule that could not start smaller than the input would be no schedule: refused, nothing made
    for size in (16, 24):
        with pytest.raises(DataError, match=rf"^`low_res` {size} is not below the input's 16 px"):
            _run(models["kept"], method="zeroq", iters=12, low_res=size)


@pytest.mark.parametrize("flag", ["slack", "lse", "sci"])
def test_each_dsg_ablation_changes_the_images(models, flag):
    """--no-slack, --no-lse and --no-sci each take their term out of the generator: the same
    seed then gives other images (and the full method's images again without the flag)."""
    full = _run(models["kept"], method="dsg", iters=10, seed=0)
    ablated = _run(models["kept"], method="dsg", iters=10, seed=0, **{flag: False})
    assert ablated.meta["config"][flag] is False and full.meta["config"][flag] is True
    assert not np.allclose(full.images, ablated.images, atol=1e-6), flag
    np.testing.assert_array_equal(full.images, _run(models["kept"], method="dsg", iters=10, seed=0).images)


def test_an_ablation_of_a_term_the_run_does_not_have_is_refused(models):
    """Slack margins and layerwise enhancement weigh DSG's per-sample terms, so with the batch's
    alignment (or for zeroq) switching them off would make the same images: refused in one line,
    as is switching off SCI for a method without it."""
    with pytest.raises(DataError, match=r"^`slack` changes nothing for `method` dsg with `alignment` batch"):
        _run(models["kept"], method="dsg", iters=1, alignment="batch", slack=False)
    with pytest.raises(DataError, match=r"^`lse` and `sci` change nothing for `method` zeroq with `alignment` sample"):
        _run(models["kept"], method="zeroq", iters=1, lse=False, sci=False)
    out = models["folder"] / "inert.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(models["kept"]), "-o", str(out), "--method", "dsg", "--iters", "1",
                                      "--num-samples", "4", "--alignment", "batch", "--no-lse", "--quiet"])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--no-lse changes nothing" in result.stderr


def test_options_the_method_does_not_read_are_refused(models):
    """Drawn images (gaussian, procedural) are never optimised, inversion matches no BN
    statistics, and only inversion has an anchor: an option the given method would not read
    is a one-line error naming it, not a set made as if it were absent (the alignment, the
    iterations and the optimiser's settings were ignored for drawn images before)."""
    drawn = _run(models["kept"], method="procedural")
    for method in ("procedural", "gaussian"):
        for given in ({"iters": 5}, {"lr": 0.5}, {"alignment": "batch"}, {"low_res": 8}, {"jitter": False},
                      {"input_prior": False}):
            name = next(iter(given))
            with pytest.raises(DataError, match=rf"^`{name}` changes nothing for `method` {method}: its images are "
                                                 "drawn once, not optimised$"):
                _run(models["kept"], method=method, **given)
    # iters 0 is what drawn images are: accepted, the same images
    np.testing.assert_array_equal(_run(models["kept"], method="procedural", iters=0).images, drawn.images)
    with pytest.raises(DataError, match=r"^`alignment` and `normalize_gaps` change nothing for `method` inversion: "
                                        r"it matches no BN statistics$"):
        _run(models["kept"], method="inversion", iters=1, alignment="sample", normalize_gaps=True)
    with pytest.raises(DataError, match=r"^`anchor_weight` changes nothing for `method` dsg"):
        _run(models["kept"], method="dsg", iters=1, anchor_weight=1.0)
    # where auto decided (one command for models with and without BN statistics), said, not refused
    auto = _run(models["folded"], lr=0.5, iters=5)
    assert auto.meta["method"] == "procedural" and auto.meta["config"]["iters"] == 0, auto.meta
    assert auto.meta["method_choice"].endswith("; `lr` and `iters` change nothing for it (its images are drawn once, "
                                               "not optimised)"), auto.meta["method_choice"]
    np.testing.assert_array_equal(auto.images, _run(models["folded"], method="procedural").images)
    out = models["folder"] / "unread.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(models["kept"]), "-o", str(out), "--method", "gaussian",
                                      "--num-samples", "4", "--no-input-prior", "--iters", "3", "--quiet"])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert result.stderr.strip() == ("dsgonnx: error: --no-input-prior and --iters change nothing for --method "
                                     "gaussian: its images are drawn once, not optimised"), result.stderr


def test_the_slack_settings_act_where_dsg_has_margins_and_are_refused_elsewhere(models):
    """``epsilon`` and ``slack_reading`` place DSG's slack margins: with its per-sample alignment
    another ε makes other images; where the run has no margins (zeroq, the batch's alignment,
    ``slack`` off) they would change nothing and are refused in one line, before any work."""
    full = _run(models["kept"], method="dsg", iters=10, seed=0)
    tuned = _run(models["kept"], method="dsg", iters=10, seed=0, epsilon=0.6)
    assert tuned.meta["config"]["epsilon"] == 0.6 and not np.allclose(full.images, tuned.images, atol=1e-6)
    with pytest.raises(DataError, match=r"^`epsilon` tunes DSG's slack margins, which `method` zeroq with `alignment` "
                                        "sample does not have"):
        _run(models["kept"], method="zeroq", iters=1, epsilon=0.6)
    with pytest.raises(DataError, match=r"^`slack_reading` tunes DSG's slack margins, which `method` dsg with "
                                        "`alignment` batch does not have"):
        _run(models["kept"], method="dsg", iters=1, alignment="batch", slack_reading="channel-upper")
    with pytest.raises(DataError, match=r"^`epsilon` and `slack_reading` tune DSG's slack margins, and `slack` has "
                                        "switched them off"):
        _run(models["kept"], method="dsg", iters=1, slack=False, epsilon=0.6, slack_reading="channel-upper")
    out = models["folder"] / "inert_epsilon.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(models["kept"]), "-o", str(out), "--method", "procedural",
                                      "--num-samples", "4", "--epsilon", "0.6", "--quiet"])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert "--epsilon tunes DSG's slack margins, which --method procedural" in result.stderr, result.stderr


def test_sci_is_the_squared_gap_between_kernel_spectra_computed_independently():
    """SCI against an independent numpy computation: the eigenvalues of the cosine-similarity
    kernel of the samples and of the noise reference, their mean squared difference."""
    import torch

    from dsgonnx.synth.losses import sample_correlation_inhibition

    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 3, 8, 8))
    samples = (base + 0.3 * rng.standard_normal((6, 3, 8, 8))).astype(np.float32)  # alike: one large eigenvalue
    reference = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)

    def spectrum(batch):
        rows = batch.reshape(len(batch), -1).astype(np.float64)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return np.linalg.eigvalsh(rows @ rows.T)

    expected = np.mean((spectrum(samples) - spectrum(reference)) ** 2)
    got = float(sample_correlation_inhibition(torch.from_numpy(samples), torch.from_numpy(reference)))
    assert got == pytest.approx(expected, rel=1e-4) and expected > 0.1  # alike samples are far from noise
    alike_gap = abs(spectrum(samples)[-1] - spectrum(reference)[-1])
    assert alike_gap > 1  # the dominant eigenvalue is what the loss pushes down


def test_the_generator_weighs_sci_by_one_over_the_number_of_bn_layers(models, monkeypatch):
    """The SCI term the generator optimises is the loss function's value / #BN (the paper's
    weighting, beside the per-layer BN terms): with the loss pinned to 7, the term is 7 / 2."""
    import torch

    import dsgonnx.synth.generator as generator

    monkeypatch.setattr(generator.losses, "sample_correlation_inhibition",
                        lambda samples, reference: samples.sum() * 0 + torch.tensor(7.0))
    seen = {}
    terms = generator._Run._terms

    def spy(self, n, first):
        def recorded(name, term):
            def run(*args):
                value = term(*args)
                seen.setdefault(name, float(value.detach()))
                return value
            return run
        return [(name, recorded(name, term)) for name, term in terms(self, n, first)]

    monkeypatch.setattr(generator._Run, "_terms", spy)
    _run(models["kept"], method="dsg", iters=2)
    assert seen["sci"] == pytest.approx(7.0 / 2)  # the tiny model has 2 BN layers


def test_reading_the_loss_every_few_steps_changes_nothing_but_when(models, monkeypatch):
    """On CUDA the loss is read every SYNC_EVERY iterations (no host sync per step); forced on
    the CPU, the images equal per-step reading while the plateau schedule does not fire, and a
    NaN is still reported with its term and exact iteration."""
    import dsgonnx.synth.generator as generator

    per_step = _run(models["kept"], iters=23, seed=2, patience=1000)
    monkeypatch.setitem(generator.SYNC_EVERY, "cpu", 7)
    batched = _run(models["kept"], iters=23, seed=2, patience=1000)
    np.testing.assert_array_equal(per_step.images, batched.images)
    assert len(batched.meta["config"]) and batched.meta["seconds_per_iter"] > 0

    model = onnx.load(str(models["kept"]))
    first_bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    model.graph.node.insert(list(model.graph.node).index(first_bn),
                            helper.make_node("Sqrt", [first_bn.input[0]], ["sqrt_out"], name="sqrt"))
    first_bn.input[0] = "sqrt_out"
    path = models["folder"] / "nan-batched.onnx"
    onnx.save(model, str(path))
    with pytest.raises(SynthesisError, match="loss term 'bn' became nan at iteration 0"):
        _run(path, method="zeroq", iters=10)


def test_procedural_start_optimises_dead_leaves_with_the_gaussian_margins(models, monkeypatch):
    """``start`` procedural: zeroq/dsg begin at the dead-leaves images the procedural method
    draws (iters 0 gives them back exactly), optimisation still pulls the BN statistics to
    the running ones, and DSG's slack margins are read on the same Gaussian batch the
    noise start would have begun from (the papers' definition, not the start's)."""
    import dsgonnx.synth.generator as generator
    from dsgonnx.synth.procedural import procedural_images

    recipe = PRESETS["imagenet"]
    settings = dict(method="dsg", num_samples=8, seed=2, preprocess=recipe)
    drawn = _run(models["kept"], start="procedural", iters=0, **settings)
    np.testing.assert_array_equal(drawn.images, procedural_images(8, (3, 16, 16), 2, recipe))
    assert drawn.meta["config"]["start"] == "procedural"

    margins = []
    read = generator.slack_margins

    def spy(*args):
        margins.append(read(*args))
        return margins[-1]

    monkeypatch.setattr(generator, "slack_margins", spy)
    optimised = _run(models["kept"], start="procedural", iters=40, **settings)
    noise = _run(models["kept"], iters=1, **settings)
    assert _total(optimised) < 0.5 * _total(drawn)
    assert not np.allclose(optimised.images, noise.images, atol=0.1)
    assert len(margins) == 4  # two BN layers, each run
    for ours, theirs in zip(margins[:2], margins[2:]):
        assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.std, theirs.std)


def test_procedural_start_keeps_more_spread_between_samples(models):
    """Dead leaves differ from one another in colour, contrast and scale where noise images
    all share one set of statistics; with the batch's pooled statistics aligned (each
    sample free) that spread survives the optimisation."""
    settings = dict(method="dsg", alignment="batch", iters=40, num_samples=16, seed=0, preprocess=PRESETS["imagenet"])
    noise = _run(models["kept"], **settings)
    leaves = _run(models["kept"], start="procedural", **settings)
    assert leaves.meta["diversity"]["stat_spread"] > 1.2 * noise.meta["diversity"]["stat_spread"]
    assert leaves.meta["diversity"]["sample_similarity"] < noise.meta["diversity"]["sample_similarity"]


def test_procedural_start_is_refused_for_drawn_gaussian_images(models):
    with pytest.raises(DataError, match="`start` procedural has no meaning for `method` gaussian"):
        _run(models["kept"], method="gaussian", start="procedural")
    result = CliRunner().invoke(cli, ["synthesize", str(models["kept"]), "-o", str(models["folder"] / "g.npz"),
                                      "--method", "gaussian", "--start", "procedural"])
    assert result.exit_code == 2 and "--start procedural has no meaning for --method gaussian" in result.stderr
    assert "Traceback" not in result.output and not (models["folder"] / "g.npz").exists()


def test_jitter_moves_each_step_and_is_on_by_default_for_inversion_only(models, monkeypatch):
    """``jitter``: every optimisation step runs the model on a shifted, mirrored copy of the
    batch (DeepInversion's); unset, inversion jitters and zeroq/dsg do not. The jittered DSG
    still lowers the BN loss, to other images than the unjittered run from the same seed."""
    import dsgonnx.synth.generator as generator

    calls = []
    jitter = generator._Run._jitter

    def spy(self, images):
        calls.append(tuple(images.shape))
        return jitter(self, images)

    monkeypatch.setattr(generator._Run, "_jitter", spy)
    settings = dict(method="dsg", iters=20, seed=1, preprocess=PRESETS["imagenet"])
    plain = _run(models["kept"], **settings)
    assert calls == [] and plain.meta["config"]["jitter"] is False
    moved = _run(models["kept"], jitter=True, **settings)
    assert calls == [(8, 3, 16, 16)] * 20 and moved.meta["config"]["jitter"] is True
    assert not np.allclose(plain.images, moved.images, atol=1e-3)
    start = _total(_run(models["kept"], method="dsg", iters=0, seed=1, preprocess=PRESETS["imagenet"]))
    assert _total(moved) < 0.6 * start and _total(plain) < 0.6 * start
    calls.clear()
    assert _run(models["kept"], method="inversion", iters=3).meta["config"]["jitter"] is True and len(calls) == 3
    calls.clear()
    assert _run(models["kept"], method="inversion", iters=3, jitter=False).meta["config"]["jitter"] is False
    assert calls == []


def _cli_settings(models, name: str, method: str, *flags: str) -> dict:
    """The settings ``dsgonnx synthesize`` recorded for a short run with ``flags``."""
    out = models["folder"] / f"{name}.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(models["kept"]), "-o", str(out), "--method", method,
                                      "--iters", "2", "--num-samples", "4", "--holdout", "0", *flags])
    assert result.exit_code == 0, result.output
    return SyntheticSet.load(out).meta["config"]


def test_jitter_flag_reaches_the_synthesis(models):
    assert _cli_settings(models, "jit", "dsg", "--jitter")["jitter"] is True
    assert _cli_settings(models, "inv", "inversion", "--no-jitter")["jitter"] is False


def test_generator_learns_the_images_as_its_output(models, monkeypatch):
    """``generator`` (Genie's parameterisation): each batch's images are ``G(z)`` of a fresh
    generator, and it is the generator's weights and the latents that the BN loss trains,
    through the whole resolution schedule (at low resolution the model sees ``G(z)``
    downsampled); the images stay in the pixel box and are reproducible from the seed."""
    import dsgonnx.synth.generator as generator
    from dsgonnx.synth.latent import LatentGenerator

    made, phases = [], []
    original_init, iterate = generator._Generated.__init__, generator._Run._iterate

    def keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        made.append((self, {k: v.detach().clone() for k, v in self.net.state_dict().items()}, self.z.detach().clone()))

    def spy(self, source, tap, margins, label, first, iters):
        phases.append((source, tuple(source().shape[2:]), iters))
        return iterate(self, source, tap, margins, label, first, iters)

    monkeypatch.setattr(generator._Generated, "__init__", keep)
    monkeypatch.setattr(generator._Run, "_iterate", spy)
    recipe = PRESETS["imagenet"]
    settings = dict(method="dsg", alignment="batch", seed=2, preprocess=recipe, generator=True)
    untrained = _run(models["kept"], iters=0, **settings)
    made.clear(), phases.clear()
    trained = _run(models["kept"], iters=40, low_res=8, low_res_share=0.5, **settings)
    assert len(made) == 1 and [(size, n) for _, size, n in phases] == [((8, 8), 20), ((16, 16), 20)]
    source, weights, latents = made[0]
    assert all(each is source for each, _, _ in phases)  # one generator through the schedule
    assert not torch.equal(source.z.detach(), latents)
    moved = [name for name, value in source.net.state_dict().items()
             if value.is_floating_point() and not torch.equal(value, weights[name])]
    assert "project.weight" in moved and "body.2.weight" in moved and "body.6.weight" in moved
    # the images written are the trained generator's output on the trained latents
    with torch.no_grad():
        again = source.result().cpu().numpy()
    np.testing.assert_allclose(trained.images, again, atol=1e-5)
    assert _total(trained) < 0.9 * _total(untrained)  # (slower than the pixels: Genie runs 4000 steps)
    low = (0 - np.array(recipe.mean)) / np.array(recipe.std)
    high = (1 - np.array(recipe.mean)) / np.array(recipe.std)
    per_channel = trained.images.transpose(1, 0, 2, 3).reshape(3, -1)
    assert (per_channel.min(1) >= low - 1e-6).all() and (per_channel.max(1) <= high + 1e-6).all()
    assert trained.meta["config"]["generator"] is True
    monkeypatch.undo()
    plain = _run(models["kept"], iters=40, low_res=8, low_res_share=0.5, **{**settings, "generator": False})
    repeat = _run(models["kept"], iters=40, low_res=8, low_res_share=0.5, **settings)
    np.testing.assert_array_equal(repeat.images, trained.images)
    assert not np.allclose(plain.images, trained.images, atol=1e-2)
    assert isinstance(generator._Generated(2, (3, 16, 16), 0.1, torch.Generator().manual_seed(0), torch.device("cpu"),
                                           None, torch.contiguous_format).net, LatentGenerator)


def test_generator_makes_batches_of_at_most_its_own_size():
    from types import SimpleNamespace

    from dsgonnx.synth.generator import default_batch_size
    from dsgonnx.synth.latent import GENERATOR_BATCH

    loaded = SimpleNamespace(input=SimpleNamespace(chw=(3, 32, 32), shape=(None, 3, 32, 32)))
    assert default_batch_size(SynthConfig(num_samples=300), loaded, 10) == 300
    assert default_batch_size(SynthConfig(num_samples=300, generator=True), loaded, 10) == GENERATOR_BATCH
    fixed = SimpleNamespace(input=SimpleNamespace(chw=(3, 32, 32), shape=(1, 3, 32, 32)))
    assert default_batch_size(SynthConfig(num_samples=300, generator=True), fixed, 10) == 1


def test_batches_shrink_to_the_memory_their_activations_need(models, monkeypatch, caplog):
    """The default batch holds every sample up to an input-size cap; where the activations of
    such a batch would not fit in the memory available, the batches shrink to what does, say so,
    and make what an explicit ``batch_size`` of that size makes."""
    import dsgonnx.hardware
    import dsgonnx.synth.generator as generator
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.graph.to_torch import to_torch

    twin = to_torch(load_model(str(models["kept"])))
    per_image = generator.activation_bytes(twin.module, (3, 16, 16), torch.device("cpu"), torch.contiguous_format)
    # the tiny net's leaf outputs for one 16-px image: at least its 8 channels of 16×16 float32 twice (conv, BN)
    assert per_image >= 2 * 8 * 16 * 16 * 4
    roomy = _run(models["kept"], iters=3, num_samples=12)
    assert roomy.meta["batch_size"] == 12
    # memory for 5 images' activations (at MEMORY_SHARE of it and ACTIVATION_COPIES per image)
    have = int(5.5 * generator.ACTIVATION_COPIES * per_image / generator.MEMORY_SHARE)
    assert generator.memory_batch_cap(per_image, torch.device("cpu")) is not None
    monkeypatch.setattr(dsgonnx.hardware, "available_memory", lambda: have)  # memory_on reads it on a CPU
    assert generator.memory_batch_cap(per_image, torch.device("cpu")) == (5, have)
    assert generator.memory_batch_cap(per_image, torch.device("cpu"), sharing=2) == (2, have // 2)
    with caplog.at_level("INFO", logger="dsgonnx"):
        tight = _run(models["kept"], iters=3, num_samples=12)
    assert tight.meta["batch_size"] == 5 and "synthesize: batches of 5 images, not 12" in caplog.text
    monkeypatch.undo()
    np.testing.assert_array_equal(tight.images, _run(models["kept"], iters=3, num_samples=12, batch_size=5).images)
    assert not np.array_equal(tight.images, roomy.images)


@pytest.mark.parametrize("settings, message", [
    ({"method": "procedural"}, "`generator` is for the BN-matching methods (zeroq, dsg); `method` is procedural"),
    ({"method": "inversion"}, "`method` is inversion"),
    ({"method": "gaussian"}, "`method` is gaussian"),
    ({"method": "dsg", "start": "procedural"}, "`start` procedural has no meaning with it"),
])
def test_generator_is_refused_where_it_has_no_meaning(models, settings, message):
    with pytest.raises(DataError, match=re.escape(message)):
        _run(models["kept"], generator=True, **settings)
    with pytest.raises(DataError, match="`generator` must be true or false"):
        SynthConfig(generator="yes")
    out = models["folder"] / "gen.npz"
    result = CliRunner().invoke(cli, ["synthesize", str(models["folded"]), "-o", str(out), "--generator"])
    assert result.exit_code == 2 and not out.exists() and "Traceback" not in result.output
    assert result.stderr.count("\n") == 1 and "--generator is for the BN-matching methods" in result.stderr
    assert "carries no BN statistics" in result.stderr


def test_generator_and_swing_flags_reach_the_synthesis(models):
    assert _cli_settings(models, "genflag", "zeroq", "--generator")["generator"] is True
    swung = _cli_settings(models, "swingflag", "dsg", "--swing")
    assert swung["swing"] is True and swung["generator"] is False


def test_swing_shifts_each_strided_convolutions_input_by_up_to_a_pixel():
    """Genie's swing convolution: a strided Conv2d sees its input reflected by one pixel at
    each border and cropped back at a random offset in {−1, 0, 1}²; stride-1 convolutions and
    the model once detached are untouched."""
    from dsgonnx.synth.generator import _Swing

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1))
    x = torch.randn(2, 2, 8, 8)
    plain = model(x)
    random = torch.Generator().manual_seed(5)
    expected_offsets = torch.Generator().manual_seed(5)
    swing = _Swing(model, random)
    seen = set()
    for _ in range(12):
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=expected_offsets))
        seen.add((dy, dx))
        shifted = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, dy:dy + 8, dx:dx + 8]
        first = torch.nn.functional.conv2d(shifted, model[0].weight, model[0].bias, stride=2, padding=1)
        torch.testing.assert_close(model(x), model[1](first))  # (the stride-1 layer unhooked)
    assert len(seen) >= 4  # the offsets really vary
    swing.remove()
    torch.testing.assert_close(model(x), plain)
    assert not model[0]._forward_pre_hooks and not model[1]._forward_pre_hooks


def test_swing_acts_on_the_optimisation_steps_only(models, monkeypatch):
    import dsgonnx.synth.generator as generator

    shifts = []
    shift = generator._Swing._shift

    def spy(self, conv, args):
        shifts.append(tuple(args[0].shape))
        return shift(self, conv, args)

    monkeypatch.setattr(generator._Swing, "_shift", spy)
    settings = dict(method="dsg", alignment="batch", iters=30, seed=1, preprocess=PRESETS["imagenet"])
    plain = _run(models["kept"], **settings)
    assert shifts == []
    swung = _run(models["kept"], swing=True, **settings)
    strided = sum(1 for node in onnx.load(str(models["kept"])).graph.node if node.op_type == "Conv"
                  and any(a.name == "strides" and max(a.ints) > 1 for a in node.attribute))
    assert strided >= 1 and len(shifts) == 30 * strided  # each step's forward, not the margins or the final read
    assert swung.meta["config"]["swing"] is True
    assert not np.allclose(plain.images, swung.images, atol=1e-3)
    start = _total(_run(models["kept"], **{**settings, "iters": 0}))
    assert _total(swung) < 0.6 * start
    with pytest.raises(DataError, match="`swing` shifts what the model sees while images are optimised; `method` gaussian"):
        _run(models["kept"], method="gaussian", swing=True)
