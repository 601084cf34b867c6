"""How far a quantized model's top-1 moves under changes that should not matter.

Each draw copies the QDQ model and moves a share of its int32 bias integers by ±1 (one step of
the bias grid: a few hundredths of an output step at 4 bits), then scores the copy on the
benchmark's held-out images (those ``run_all.py`` scores). The spread of the draws is the
smallest top-1 difference between two such models that means anything: at low widths a
network amplifies these nudges (see the README, "How much one W4A4 figure means").

    python benchmarks/noise_floor.py cifar10_resnet20 model-w4a4.onnx
    python benchmarks/noise_floor.py cifar10_resnet20 model-w4a4.onnx --draws 8 --share 0.15 --max-eval 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quant_table import held_out  # noqa: E402
from run_all import MANIFEST  # noqa: E402


def nudge_biases(model: onnx.ModelProto, share: float, rng: np.random.Generator) -> int:
    """Move ``share`` of the int32 bias integers (DequantizeLinear inputs) by ±1 in place;
    returns how many moved."""
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    moved = 0
    for tensor in model.graph.initializer:
        if tensor.name not in dequantized or tensor.data_type != onnx.TensorProto.INT32:
            continue
        values = numpy_helper.to_array(tensor).astype(np.int64)
        chosen = rng.random(values.shape) < share
        values[chosen] += rng.choice([-1, 1], size=int(chosen.sum()))
        info = np.iinfo(np.int32)
        tensor.CopyFrom(numpy_helper.from_array(np.clip(values, info.min, info.max).astype(np.int32), tensor.name))
        moved += int(chosen.sum())
    return moved


def _predict(path: Path, images: np.ndarray, batch: int = 250) -> np.ndarray:
    from dsgonnx.runtime import ort_session

    session = ort_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MANIFEST), help="the benchmark model the QDQ file quantizes")
    parser.add_argument("qdq", type=Path, help="the quantized model")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--share", type=float, default=0.15, help="share of the bias integers moved in each draw")
    parser.add_argument("--num-samples", type=int, default=100, help="calibration images left out, as run_all.py")
    parser.add_argument("--max-eval", type=int, help="score on this many held-out images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.preprocess import preprocess_from_preset

    path, data, (preset, overrides), _ = MANIFEST[args.model]
    images, labels = held_out(load_model(path), data, preprocess_from_preset(preset, **overrides), args.num_samples,
                              args.max_eval)
    labels = np.asarray(labels)

    base = _predict(args.qdq, images).argmax(1)
    top1 = [100 * float(np.mean(base == labels))]
    flips = []
    rng = np.random.default_rng(args.seed)
    model = onnx.load(str(args.qdq))
    with tempfile.TemporaryDirectory(prefix="dsgonnx-noise-") as scratch:
        for draw in range(args.draws):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            moved = nudge_biases(copy, args.share, rng)
            out = Path(scratch) / f"draw{draw}.onnx"
            onnx.save(copy, str(out))
            predicted = _predict(out, images).argmax(1)
            top1.append(100 * float(np.mean(predicted == labels)))
            flips.append(100 * float(np.mean(predicted != base)))
            print(f"draw {draw}: {moved} bias integers moved by ±1, top-1 {top1[-1]:.2f}%, "
                  f"{flips[-1]:.1f}% of predictions changed", flush=True)
    draws = np.array(top1[1:])
    print(f"{args.qdq.name} on {len(images)} images: top-1 {top1[0]:.2f}%; {args.draws} draws "
          f"{draws.mean():.2f} ± {draws.std():.2f} (min {draws.min():.2f}, max {draws.max():.2f}); "
          f"predictions changed {np.mean(flips):.1f}% on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
