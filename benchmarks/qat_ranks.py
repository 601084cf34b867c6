"""QAT steps per second in one process and split over torchrun's ranks, and how far apart the
two written models are.

Runs ``dsgonnx quantize MODEL --qat`` once as one process and once under ``torchrun
--nproc-per-node N`` with the same calibration set and settings (no fallback, no
validation), then prints for each: wall seconds, QAT steps per second (the report's
``qat.steps_per_second``), and the share of weight integers on which the two models differ
(data parallel QAT takes the step one process takes on the whole batch, so this should be
~0; float sums in another order may move a weight that sits on a rounding boundary).

    python benchmarks/qat_ranks.py ../shared/models/cifar10_resnet20.onnx --calib set.npz --ranks 2 --iters 200
    python benchmarks/qat_ranks.py MODEL --calib set.npz --ranks 4 --device cuda --batch 64

On N CPU processes each rank runs one thread (torchrun's ``OMP_NUM_THREADS=1``); the one
process gets ``--threads`` (default: N), so both use the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(command: list[str], env: dict, summary: bool = True) -> tuple[dict, float]:
    """(the command's JSON summary on stdout, or {} without ``summary``; wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return (json.loads(done.stdout) if summary else {}), seconds


def _integers(path: Path) -> dict:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith("_quantized") and t.data_type != onnx.TensorProto.INT32}


def _top1(report: dict) -> str:
    """The quantized model's top-1 (and the float model's) from a validate report."""
    return (f"{report['quantized']['top1']:.2f} % (FP32 {report['fp32']['top1']:.2f} %, "
            f"agreement {100 * report['agreement']:.2f} %, {report['num_samples']} images)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--calib", required=True, help="a calibration set (.npz) or image folder")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, help="threads of the one process (default: --ranks)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--bits", default="4,4", help="weights,activations")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--val-data", help="labelled images: score both models (dsgonnx validate)")
    parser.add_argument("--validate-args", default="", help="more validate options, e.g. '--preprocess imagenet "
                        "--resize 32 --crop 32'")
    args = parser.parse_args(argv)
    wbits, abits = args.bits.split(",")
    binary = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="qat-ranks-") as scratch:
        common = [str(args.model), "--calib", str(args.calib), "--num-samples", str(args.num_samples),
                  "--wbits", wbits, "--abits", abits, "--qat", "--qat-iters", str(args.iters),
                  "--qat-batch-size", str(args.batch), "--no-fallback", "--no-validate", "--device", args.device,
                  "--force", "--quiet"]
        one, split = Path(scratch) / "one.onnx", Path(scratch) / "split.onnx"
        threads = str(args.threads or args.ranks)
        alone, alone_s = _run([str(binary / "dsgonnx"), "quantize", *common, "-o", str(one)],
                              dict(os.environ, OMP_NUM_THREADS=threads, PYTHONWARNINGS="ignore"))
        ranked, ranked_s = _run([str(binary / "torchrun"), "--standalone", "--nproc-per-node", str(args.ranks),
                                 str(binary / "dsgonnx"), "quantize", *common, "-o", str(split)],
                                dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
        a, b = _integers(one), _integers(split)
        differ = sum(int((a[name] != b[name]).sum()) for name in a)
        total = sum(a[name].size for name in a)
        scores = {}
        if args.val_data:
            for name, path in (("one", one), ("split", split)):
                report = Path(scratch) / f"{name}.json"
                _run([str(binary / "dsgonnx"), "validate", str(args.model), str(path), "--data", args.val_data,
                      "--report", str(report), *args.validate_args.split()], dict(os.environ, PYTHONWARNINGS="ignore"), False)
                scores[name] = json.loads(report.read_text())
    print(f"{Path(args.model).name} W{wbits}A{abits} QAT, {args.iters} steps of batch {args.batch} on {args.device}")
    print(f"  1 process ({threads} threads): {alone_s:7.1f} s wall, {alone['qat']['steps_per_second']} steps/s")
    print(f"  {args.ranks} ranks (1 thread each): {ranked_s:7.1f} s wall, {ranked['qat']['steps_per_second']} steps/s")
    print(f"  weight integers that differ: {differ} of {total} ({100 * differ / max(total, 1):.3f} %)")
    for name, report in scores.items():
        print(f"  top-1 of the {'one-process' if name == 'one' else 'split'} model: {_top1(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
