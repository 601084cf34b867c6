"""Synthesis against several models' BN statistics at once (``mix_models``, MixMix's feature
mixing): the merged graph computes the main model as it is, the images match the companion's
statistics as they do not without it, and companions that take other images are refused in
one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from dsgonnx.errors import InputSpecError, UnsupportedModelError
from dsgonnx.graph.bn_taps import BNProbe, find_bn_layers
from dsgonnx.graph.merge import with_companions
from dsgonnx.graph.onnx_io import load_model
from dsgonnx.graph.to_torch import to_torch
from dsgonnx.synth import SynthConfig, synthesize
from dsgonnx_cli.main import cli
from zoo import (_export_bn_kept, export_tiny_mobile, export_tiny_resnet, export_tiny_uint8, export_torchscript,
                 tiny_resnet)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    return {"folder": folder, "resnet": export_tiny_resnet(folder / "resnet.onnx"),
            "mobile": export_tiny_mobile(folder / "mobile.onnx"),
            "wider": _export_bn_kept(tiny_resnet(), torch.randn(2, 3, 24, 24), folder / "wider.onnx"),
            "uint8": export_tiny_uint8(folder / "uint8.onnx")}


def _gap(model_path, images: np.ndarray) -> float:
    """The batch's pooled BN-input statistics against the model's running ones: the mean over
    the layers of the squared mean and std gaps, summed over channels."""
    model = to_torch(load_model(model_path))
    layers = find_bn_layers(model)
    seen = {}
    with torch.no_grad(), BNProbe(model, layers, lambda layer, x: seen.__setitem__(layer.name, x)):
        model.module(torch.from_numpy(images))
    gaps = []
    for layer in layers:
        x = seen[layer.name].transpose(0, 1).flatten(1)
        std = np.sqrt(layer.running_var + layer.eps)
        gaps.append(float(((x.mean(1).numpy() - layer.running_mean) ** 2).sum()
                          + ((x.std(1).numpy() - std) ** 2).sum()))
    return float(np.mean(gaps))


def test_the_merged_graph_is_the_main_model_first_with_every_bn_layer_of_both(models):
    main = load_model(models["resnet"])
    merged = with_companions(main, [str(models["mobile"])])
    assert merged.source == main.source and merged.sha256 == main.sha256 and merged.input.chw == main.input.chw
    own = [len(find_bn_layers(to_torch(load_model(models[name])))) for name in ("resnet", "mobile")]
    assert len(find_bn_layers(to_torch(merged))) == sum(own) and min(own) > 0
    x = np.random.default_rng(0).standard_normal((4, *main.input.chw)).astype(np.float32)
    alone = ort.InferenceSession(str(models["resnet"])).run(None, {main.input.name: x})[0]
    session = ort.InferenceSession(merged.model.SerializeToString())
    both = session.run(None, {merged.input.name: x})
    companion = ort.InferenceSession(str(models["mobile"])).run(None, {"input": x})[0]
    np.testing.assert_array_equal(both[0], alone)
    np.testing.assert_array_equal(both[1], companion)
    # a companion at a newer opset: the model is brought up to it (onnx converts BN up, not down)
    newer = export_torchscript(models["folder"] / "opset17.onnx", keep_bn=True, opset=17)
    merged = with_companions(main, [str(newer)])
    assert [o.version for o in merged.model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert merged.model.ir_version == max(main.model.ir_version, onnx.load(str(newer)).ir_version)
    both = ort.InferenceSession(merged.model.SerializeToString()).run(None, {merged.input.name: x})
    np.testing.assert_allclose(both[0], alone, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(both[1], ort.InferenceSession(str(newer)).run(None, {"input": x})[0])


def test_images_made_with_a_companion_match_its_statistics_too(models):
    """Neither random tiny model's statistics can be met exactly in 60 steps; the images made
    against both sit, by each model's gaps, nearer the images made for that model alone than
    the images made for the other one."""
    settings = dict(method="dsg", alignment="batch", num_samples=16, iters=60, seed=0, device="cpu")
    resnet = synthesize(str(models["resnet"]), SynthConfig(**settings)).images
    mobile = synthesize(str(models["mobile"]), SynthConfig(**settings)).images
    mixed = synthesize(str(models["resnet"]), SynthConfig(**settings, mix_models=[str(models["mobile"])]))
    assert mixed.meta["config"]["mix_models"] == [str(models["mobile"])]
    assert mixed.meta["model"]["file"] == str(models["resnet"]) and mixed.images.shape == resnet.shape
    for name, own, other in (("mobile", mobile, resnet), ("resnet", resnet, mobile)):
        gaps = {what: _gap(models[name], images) for what, images in (("own", own), ("other", other),
                                                                      ("mixed", mixed.images))}
        assert gaps["own"] < gaps["other"] and gaps["mixed"] < (gaps["own"] + gaps["other"]) / 2, (name, gaps)


def test_companions_that_take_other_images_are_refused_in_one_line(models, tmp_path):
    main = load_model(models["resnet"])
    with pytest.raises(InputSpecError, match="takes 3×24×24 images"):
        with_companions(main, [str(models["wider"])])
    with pytest.raises(InputSpecError, match="takes whole pixels"):
        with_companions(main, [str(models["uint8"])])
    with pytest.raises(UnsupportedModelError, match="takes whole pixels"):
        with_companions(load_model(models["uint8"]), [str(models["resnet"])])
    runner = CliRunner()
    for companion, message in ((models["wider"], "takes 3×24×24 images"), (tmp_path / "none.onnx", "not found")):
        out = tmp_path / "set.npz"
        bad = runner.invoke(cli, ["synthesize", str(models["resnet"]), "-o", str(out), "--mix-model", str(companion),
                                  "--num-samples", "4", "--iters", "2"])
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not out.exists()
    # quantize hands its synthesis the companions; with images from files they would change nothing
    bad = runner.invoke(cli, ["quantize", str(models["resnet"]), "-o", str(tmp_path / "q.onnx"), "--calib", "gaussian",
                              "--synth-mix-model", str(models["mobile"]), "--quiet"])
    assert bad.exit_code == 2 and "--synth-mix-model" in bad.stderr, bad.stderr
    assert not (tmp_path / "q.onnx").exists()
    good = runner.invoke(cli, ["quantize", str(models["resnet"]), "-o", str(tmp_path / "q.onnx"), "--calib", "dsg",
                               "--synth-mix-model", str(models["mobile"]), "--iters", "3", "--num-samples", "8",
                               "--report", str(tmp_path / "r.json"), "--quiet"])
    assert good.exit_code == 0, good.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration"]["synth"]["mix_models"] == [str(models["mobile"])]
