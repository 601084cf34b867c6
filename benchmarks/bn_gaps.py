"""How far a set of images sits from a model's BN statistics, layer by layer, in units of each
channel's running std — beside the same figures for the model's real calibration images.

For every BN input: ``per-sample``, the mean over samples and channels of the squared gaps of
each sample's channel mean and std ((μ̃−μ)/σ, (σ̃−σ)/σ), which is what ZeroQ/DSG minimise per
sample (there in absolute units); ``pooled``, the same gaps of the whole set's statistics, i.e.
how well the set as a population matches. Real images sit far from the targets one by one
(their own content) and close to them pooled; a synthetic set that is close per sample but far
pooled in some layers is matched there in neither sense. Also the float model's mean top softmax
probability and how many classes its argmax covers.

    python benchmarks/bn_gaps.py mobilenet_v1_0.75 SET.npz [SET2.npz ...] [--layers 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_all import MANIFEST  # noqa: E402


def gaps(torch_model, layers, images: np.ndarray, batch: int = 50) -> dict:
    """Per-layer ``(per-sample, pooled)`` squared gaps in std units, and the softmax summary."""
    import torch

    from dsgonnx.graph.bn_taps import BNProbe
    from dsgonnx.synth import losses

    stats: dict = {layer.name: [] for layer in layers}
    outputs = []
    with torch.no_grad(), BNProbe(torch_model, layers, lambda layer, x: stats[layer.name].append(
            losses.per_sample_stats(x))):
        for start in range(0, len(images), batch):
            out = torch_model.module(torch.from_numpy(images[start:start + batch]))
            outputs.append((out[0] if isinstance(out, (tuple, list)) else out).float().reshape(len(out), -1))
    probs = torch.softmax(torch.cat(outputs), dim=1)
    rows = {}
    for layer in layers:
        mean = torch.cat([m for m, _ in stats[layer.name]])
        std = torch.cat([s for _, s in stats[layer.name]])
        target_mean = torch.from_numpy(layer.running_mean).float()
        target_std = torch.sqrt(torch.from_numpy(layer.running_var).float() + layer.eps)
        known = torch.isfinite(target_std)
        scale = torch.where(known, target_std, torch.ones_like(target_std))
        per_sample = (((mean - target_mean) / scale) ** 2).mean() + \
            (((std - target_std) / scale)[:, known] ** 2).mean()
        pooled_mean = mean.mean(0)
        pooled_std = torch.sqrt(((std ** 2 + mean ** 2).mean(0) - pooled_mean ** 2).clamp_min(0))
        pooled = (((pooled_mean - target_mean) / scale) ** 2).mean() + \
            (((pooled_std - target_std) / scale)[known] ** 2).mean()
        rows[layer.name] = (layer.channels, float(per_sample), float(pooled))
    return {"layers": rows, "max_softmax": float(probs.max(1).values.mean()),
            "classes": len(set(probs.argmax(1).tolist()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(MANIFEST))
    parser.add_argument("sets", nargs="+", help="image sets (.npz from dsgonnx synthesize) in the model's input space")
    parser.add_argument("--num-samples", type=int, default=100, help="real calibration images, as run_all.py picks them")
    parser.add_argument("--layers", type=int, default=0, help="print every k-th layer only (0: all)")
    args = parser.parse_args(argv)

    from dsgonnx.calibration_data import load_real_images
    from dsgonnx.graph.bn_taps import find_bn_layers
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.graph.to_torch import to_torch
    from dsgonnx.preprocess import preprocess_from_preset

    path, data, (preset, overrides), _ = MANIFEST[args.model]
    loaded = load_model(str(path))
    torch_model = to_torch(loaded)
    layers = find_bn_layers(torch_model)
    if not layers:
        print(f"{args.model} carries no BN statistics", file=sys.stderr)
        return 2
    recipe = preprocess_from_preset(preset, **overrides)
    sets = {"real": load_real_images(str(data), loaded.input, args.num_samples, recipe).images}
    for item in args.sets:
        sets[Path(item).name] = load_real_images(item, loaded.input, 10 ** 9, recipe).images
    found = {name: gaps(torch_model, layers, images) for name, images in sets.items()}
    names = list(found)
    print("| layer | C | " + " | ".join(f"{n} per-sample | {n} pooled" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    for i, layer in enumerate(layers):
        if args.layers and i % args.layers and i != len(layers) - 1:
            continue
        cells = " | ".join(f"{found[n]['layers'][layer.name][1]:.3f} | {found[n]['layers'][layer.name][2]:.3f}"
                           for n in names)
        print(f"| {layer.name} | {layer.channels} | {cells} |")
    mean_rows = " | ".join(
        f"{np.mean([v[1] for v in found[n]['layers'].values()]):.3f} | "
        f"{np.mean([v[2] for v in found[n]['layers'].values()]):.3f}" for n in names)
    print(f"| mean over layers | | {mean_rows} |")
    for name in names:
        print(f"{name}: {len(sets[name])} images, float model's mean top softmax {found[name]['max_softmax']:.3f}, "
              f"argmax covers {found[name]['classes']} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
