"""Top-1 of a model quantized at several bit widths, calibrated on real or synthetic data.

For each calibration source (real images from a split disjoint from evaluation, Gaussian
noise, ZeroQ, DSG without SCI, DSG) the images are made once and the same ONNX Runtime
quantizer settings are applied at each bit width; accuracy is measured with
``dsgonnx validate`` on the held-out labelled images. Prints a Markdown table and writes
the figures as JSON.

Example (CIFAR-10 ResNet-20, paper settings, CPU):
    python benchmarks/quant_table.py ../shared/models/cifar10_resnet20.onnx \\
        --data ../shared/datasets/cifar10-test --preprocess imagenet --resize 32 --crop 32 \\
        --iters 500 --num-samples 100 --json /tmp/r20.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {
    "real": None,
    "gaussian": {"method": "gaussian"},
    "zeroq": {"method": "zeroq"},
    "dsg-nosci": {"method": "dsg", "sci": False},
    "dsg": {"method": "dsg"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="labelled image folder; every k-th image calibrates 'real'")
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--resize", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--bits", default="8,6,4")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--slack-reading")
    parser.add_argument("--synth-batch", type=int)
    parser.add_argument("--low-res", type=int, help="synthesis resolution schedule (see dsgonnx synthesize)")
    parser.add_argument("--calibrator", default="minmax")
    parser.add_argument("--logits", default="float")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-eval", type=int, help="evaluate on at most this many held-out images")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import numpy as np

    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.pipeline import quantize
    from dsgonnx.preprocess import preprocess_from_preset, scan_image_folder
    from dsgonnx.quant import QuantConfig
    from dsgonnx.synth import SynthConfig, synthesize
    from dsgonnx.validate import ValidateConfig, validate

    recipe = preprocess_from_preset(args.preprocess, resize=args.resize, crop=args.crop)
    loaded = load_model(args.model)
    bits = [int(b) for b in args.bits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    folder = scan_image_folder(args.data)
    stride = len(folder.files) // args.num_samples
    calib_files = frozenset(folder.files[i * stride] for i in range(args.num_samples))
    exclude = set(calib_files)
    if args.max_eval:
        rest = [f for f in folder.files if f not in calib_files]
        keep = set(rest[:: max(1, len(rest) // args.max_eval)][: args.max_eval])
        exclude |= set(rest) - keep
    results = {"model": args.model, "bits": bits, "rows": {}, "machine": platform.platform(),
               "python": sys.version.split()[0], "argv": sys.argv}
    fp_top1 = None
    with tempfile.TemporaryDirectory() as scratch:
        for source in args.sources.split(","):
            runs = {b: [] for b in bits}
            seconds = []
            for seed in (seeds if source != "real" else [0]):
                if source == "real":
                    calib = args.data
                else:
                    settings = dict(SOURCES[source], num_samples=args.num_samples, iters=args.iters, seed=seed,
                                    device=args.device, preprocess=recipe, quiet=True)
                    if args.lr:
                        settings["lr"] = args.lr
                    if args.slack_reading:
                        settings["slack_reading"] = args.slack_reading
                    if args.synth_batch:
                        settings["batch_size"] = args.synth_batch
                    if args.low_res:
                        settings["low_res"] = args.low_res
                    start = time.perf_counter()
                    synthetic = synthesize(loaded, SynthConfig(**settings))
                    seconds.append(time.perf_counter() - start)
                    calib = str(Path(scratch) / f"{source}-{seed}.npz")
                    synthetic.save(calib)
                for b in bits:
                    out = Path(scratch) / f"{source}-{seed}-w{b}a{b}.onnx"
                    quantize(loaded, QuantConfig(wbits=b, abits=b, calib=calib, num_samples=args.num_samples,
                                                 calibrator=args.calibrator, logits=args.logits, preprocess=recipe,
                                                 output=str(out), force=True, validate=False, quiet=True))
                    report = validate(args.model, str(out), ValidateConfig(
                        data=args.data, preprocess=recipe, exclude_files=frozenset(exclude)))
                    data = report.to_dict()
                    fp_top1 = data["fp32"]["top1"]
                    runs[b].append(data["quantized"]["top1"])
                    print(f"{source} seed {seed} W{b}A{b}: {data['quantized']['top1']:.2f}% "
                          f"(fp32 {fp_top1:.2f}%, {data['num_samples']} images)", file=sys.stderr)
            results["rows"][source] = {
                "top1": {b: [round(float(np.mean(v)), 2), round(float(np.std(v)), 2)] for b, v in runs.items()},
                "synthesis_seconds": round(float(np.mean(seconds)), 1) if seconds else 0.0,
            }
    results["fp32_top1"] = fp_top1
    print(f"| calibration | " + " | ".join(f"W{b}A{b}" for b in bits) + " | synthesis s |")
    print("|---|" + "---|" * (len(bits) + 1))
    for source, row in results["rows"].items():
        cells = [f"{m:.2f}" + (f" ± {s:.2f}" if len(seeds) > 1 and source != "real" else "") for m, s in
                 (row["top1"][b] for b in bits)]
        print(f"| {source} | " + " | ".join(cells) + f" | {row['synthesis_seconds']} |")
    print(f"FP32 top-1: {fp_top1:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
