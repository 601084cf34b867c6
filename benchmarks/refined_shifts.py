"""How much of bias correction a refined model wants, scored on the held-out real images
(and, to tell a model that fits its calibration images only from one that fits none, on those).

quantize's refined candidates differ only in the biases of the refined layers: ``refined``
subtracts each layer's whole shift ΔW·E[x] (ΔW: the refined integers minus the weights before
refinement; E[x] from the BN statistics where they reach the layer, else the calibration
images), ``refined-uncorrected`` keeps the biases reconstruction left (ΔW·E[x] not subtracted).
Reconstruction fits its rounding to the calibration images, shift included; this builds, from
the uncorrected candidate, the corrections in between and scores them all:

* ``gap``: subtract ΔW·(E_BN[x] − E_calib[x]) only, on the layers whose E[x] the BN statistics
  give: the shift the calibration images could not show reconstruction (their input means
  differ from the BN statistics' there), keeping what it learned on them;
* ``half``: subtract ½·ΔW·E[x];
* ``full``: subtract ΔW·E[x] again (rebuilt here: it must score as ``refined`` does, a check of
  the construction);
* ``sequential``: every quantized layer's bias set, layer by layer in graph order, so that its
  output's per-channel mean over the calibration images in the quantized model (the layers
  before it already set) is the float model's: the whole systematic error reaching the layer,
  quantized activations included, where the others take the weights' ΔW·E[x] alone. Measured
  here, not in the library (README, 'How much bias correction a refined model wants': it helps
  one model and breaks another).

Needs a folder of candidates from a ``…+cands`` row kept unscored (``run_all.py
--defer-scoring``: ``<out>/models/<row>-<seed>-w<b>a<b>-candidates``) and the calibration images
that row used (the synthetic set's .npz in ``--calib-cache``, or the model's image folder: the
real rows' calibration files)::

    python benchmarks/run_all.py --profile cpu --device cpu --calib-cache /tmp/calcache --out /tmp/l0 \\
        --models efficientnet_lite0 --bits 4 --sources dsg-batch+refine+qdropin+cands+held --defer-scoring
    python benchmarks/refined_shifts.py efficientnet_lite0 \\
        /tmp/l0/models/dsg-batch+refine+qdropin+cands+held-0-w4a4-candidates /tmp/calcache/efficientnet_lite0-dsg-*.npz
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def refined_layers(corrected, uncorrected) -> list[str]:
    """The layers whose biases the two candidates disagree on: the refined ones (the other
    layers are corrected alike in both)."""
    from onnx import numpy_helper

    def biases(model):
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        producers = {out: node for node in model.graph.node for out in node.output}
        found = {}
        for node in model.graph.node:
            if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
                dq = producers.get(node.input[2])
                found[node.name] = inits.get(dq.input[0] if dq is not None else node.input[2])
        return found

    one, other = biases(corrected), biases(uncorrected)
    return sorted(name for name in one if one[name] is not None and other.get(name) is not None
                  and not np.array_equal(one[name], other[name]))


def sequential(qdq_path: Path, float_model, input_name: str, images) -> int:
    """Set each quantized Conv/Gemm's bias of the QDQ model at ``qdq_path`` (in place), in graph
    order, so that its output's per-channel mean over ``images`` is ``float_model``'s; the
    number of layers set."""
    import onnx

    from dsgonnx.quant.correct import _set_bias, correctable_layers, tensor_means

    qdq = onnx.load(str(qdq_path))
    float_outputs = {node.name: node.output[0] for node in float_model.graph.node}
    layers = [name for name in correctable_layers(qdq) if name in float_outputs]
    probe = qdq_path.with_suffix(".probe.onnx")
    targets = tensor_means(float_model, probe, input_name, images, [float_outputs[name] for name in layers], 20)
    nodes = {node.name: node for node in qdq.graph.node}
    for name in layers:
        output = nodes[name].output[0]
        shift = tensor_means(qdq, probe, input_name, images, [output], 20)[output] - targets[float_outputs[name]]
        _set_bias(qdq, nodes[name], {out: n for n in qdq.graph.node for out in n.output},
                  {t.name: t for t in qdq.graph.initializer}, shift)
    onnx.save(qdq, str(qdq_path))
    return len(layers)


def build_variants(loaded, folder: Path, calib, scratch: Path) -> dict[str, Path]:
    """The corrections in between (module docstring), each built from ``folder``'s uncorrected
    candidate into ``scratch``: name -> file."""
    import onnx

    from dsgonnx.quant.correct import (analytic_means, bn_moments, correct_biases, empirical_means,
                                       input_mean_from_bn)
    from dsgonnx.quant.qdq import pre_process

    uncorrected = folder / "refined-uncorrected.onnx"
    layers = refined_layers(onnx.load(str(folder / "refined.onnx")), onnx.load(str(uncorrected)))
    prepared = pre_process(loaded.path, scratch / "prepared.onnx")
    prepared_model = onnx.load(str(prepared))
    moments = bn_moments(loaded.model)
    from_bn = analytic_means(prepared_model, moments, layers, input_mean_from_bn(prepared_model, moments))
    measured = empirical_means(prepared, loaded.input.name, calib, layers, 20)
    means = {name: from_bn.get(name, measured[name]) for name in layers}
    gaps = [float(np.abs(from_bn[name] - measured[name]).mean() / max(np.abs(from_bn[name]).mean(), 1e-12))
            for name in from_bn]
    print(f"{len(layers)} refined layers, {len(from_bn)} with E[x] from BN statistics; |E_BN − E_calib| / |E_BN| "
          f"per layer: median {np.median(gaps):.3f}" if gaps else f"{len(layers)} refined layers, none with BN means")
    built = {}
    for name, shift in (("gap", {n: from_bn[n] - measured[n] for n in from_bn}),
                        ("half", {n: 0.5 * means[n] for n in layers}), ("full", means)):
        built[name] = scratch / f"{name}.onnx"
        shutil.copy(uncorrected, built[name])
        correct_biases(built[name], prepared_model, shift)
    built["sequential"] = scratch / "sequential.onnx"
    shutil.copy(uncorrected, built["sequential"])
    print(f"sequential: {sequential(built['sequential'], prepared_model, loaded.input.name, calib)} layers set")
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a benchmark model (run_all.py's manifest)")
    parser.add_argument("candidates", help="the folder quantize --keep-candidates wrote")
    parser.add_argument("calib", help="the calibration images the row used: a synthetic set (.npz) or the image folder")
    parser.add_argument("--num-samples", type=int, default=100)
    args = parser.parse_args(argv)

    from dsgonnx import SyntheticSet, ValidateConfig, validate
    from dsgonnx.calibration_data import load_real_images
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.preprocess import preprocess_from_preset
    from quant_table import held_out
    from run_all import MANIFEST

    path, data, (preset, overrides), _ = MANIFEST[args.model]
    recipe = preprocess_from_preset(preset, **overrides)
    loaded = load_model(str(path))
    folder = Path(args.candidates)
    corrected, uncorrected = folder / "refined.onnx", folder / "refined-uncorrected.onnx"
    if not (corrected.exists() and uncorrected.exists()):
        raise SystemExit(f"{folder}: no refined.onnx and refined-uncorrected.onnx (a …+refine…+cands row's candidates)")
    if args.calib.endswith(".npz"):
        calib = SyntheticSet.load(args.calib).images[: args.num_samples]
    else:
        calib = load_real_images(args.calib, loaded.input, args.num_samples, recipe).images
    with tempfile.TemporaryDirectory() as scratch:
        built = build_variants(loaded, folder, calib, Path(scratch))
        images, labels = held_out(loaded, data, recipe, args.num_samples)
        print(f"\n| candidate | top-1 | agreement | logit SQNR dB | on the {len(calib)} calibration images: "
              f"agreement, logit SQNR dB |\n|---|---|---|---|---|")
        for name, model in {"refined-uncorrected": uncorrected, **built, "refined": corrected}.items():
            held = validate(str(path), str(model), ValidateConfig(), images=images, labels=labels).to_dict()
            fitted = validate(str(path), str(model), ValidateConfig(), images=calib).to_dict()
            print(f"| {name} | {held['quantized']['top1']:.2f} | {100 * held['agreement']:.2f} | {held['sqnr_db']:.2f} "
                  f"| {100 * fitted['agreement']:.2f}, {fitted['sqnr_db']:.2f} |", flush=True)
        print(f"(top-1, agreement and SQNR on the {len(labels)} held-out real images the benchmark scores on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
