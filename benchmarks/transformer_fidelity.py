"""Reconstruction and QAT on transformer-style networks: is the trained simulation the file,
and what does refinement gain over plain rounding?

The tests' tiny ViT (two encoder layers: attention and MLP as MatMul/Gemm on tokens,
LayerNormalization, GELU) and ConvNeXt (depthwise Conv, LayerNormalization, an MLP fused into
Gemms at its fixed batch 1) are quantized on ``--calib`` standard-normal images, plainly, with
``--refine brecq`` and with ``--qat``. For each, printed: the layers refined, what the file
quantizes that the trained simulation leaves float (``unsimulated``), the trained simulation's
logit SQNR and top-1 agreement against the written file (``fidelity``, on the calibration
images), and the written model's logit SQNR against the float model on ``--eval`` fresh
standard-normal images (plain rounding as the baseline). Random weights and inputs: a check of
the machinery, not an accuracy figure.

    python benchmarks/transformer_fidelity.py --record
    python benchmarks/transformer_fidelity.py --bits 4 --iters 1000 --nets vit

``--record`` (the default settings only) writes the table, with the machine and the command, to
``benchmarks/transformer_fidelity.md``, the section of the benchmark of record that
``run_all.py`` carries into RESULTS.md, and puts it in RESULTS.md now.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from zoo import export_tiny_convnext, export_tiny_vit  # noqa: E402

sys.path.insert(0, str(HERE))
from run_all import RECORD_SECTIONS, _cpu_name, _versions  # noqa: E402

from dsgonnx import QatConfig, QuantConfig, RefineConfig, quantize  # noqa: E402
from dsgonnx.validation.metrics import sqnr_db  # noqa: E402


def _run(path: Path, images: np.ndarray, batch: int) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", nargs="+", default=["vit", "convnext"], choices=["vit", "convnext"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--modes", nargs="+", default=["refine", "qat"], choices=["refine", "qat"])
    parser.add_argument("--calib", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--eval", type=int, default=512, help="fresh images scored against the float model (512)")
    parser.add_argument("--iters", type=int, default=200, help="reconstruction iterations per unit, QAT steps (200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true",
                        help="write the table to the benchmark of record (default settings only)")
    args = parser.parse_args(argv)
    defaults = parser.parse_args([])
    if args.record and any(getattr(args, k) != getattr(defaults, k) for k in vars(defaults) if k != "record"):
        parser.error("--record takes the default settings only (the record's command is the plain one)")
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(args.seed)
    calib = rng.standard_normal((args.calib, 3, 16, 16)).astype(np.float32)
    fresh = rng.standard_normal((args.eval, 3, 16, 16)).astype(np.float32)
    started = time.time()
    table = ["| net | bits | mode | layers refined | unsimulated | sim vs file SQNR dB (agreement) | file vs float SQNR dB |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(table))
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for net in args.nets:
            path = export_tiny_vit(folder / "vit.onnx") if net == "vit" else export_tiny_convnext(folder / "cn.onnx")
            batch = 1 if net == "convnext" else 64  # (the ConvNeXt fixes its batch at 1)
            floats = _run(path, fresh, batch)
            for bits in args.bits:
                for mode in ["plain", *args.modes]:
                    out = folder / f"{net}-{bits}-{mode}.onnx"
                    extra = {}
                    if mode == "refine":
                        extra["refine"] = RefineConfig(iters=args.iters, batch_size=16)
                    elif mode == "qat":
                        extra["qat"] = QatConfig(iters=args.iters, batch_size=16)
                    done = quantize(str(path), QuantConfig(wbits=bits, abits=bits, calib=calib, num_samples=args.calib,
                                                           holdout=0, output=str(out), validate=False, seed=args.seed,
                                                           force=True, **extra))
                    report = done.refine if mode != "plain" else None  # (QAT reports there too)
                    quality = sqnr_db(floats, _run(done.output, fresh, batch))
                    if report is None:
                        table.append(f"| {net} | W{bits}A{bits} | plain | | | | {quality:.2f} |")
                    else:
                        figures = report.get("fidelity", {})
                        table.append(f"| {net} | W{bits}A{bits} | {mode} | {len(report['refined_layers'])} "
                                     f"| {len(report['unsimulated'])} | {figures.get('sqnr_db')} ({figures.get('agreement')}) "
                                     f"| {quality:.2f} |")
                    print(table[-1], flush=True)
    if args.record:
        _record(table, time.time() - started)


HEADING = "## transformers (tiny, random weights)"


def _record(table: list[str], seconds: float) -> None:
    """Write the section of the benchmark of record and put it in RESULTS.md in place of the old one."""
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    section = "\n".join([
        HEADING, "",
        "Is the trained simulation the written file on networks with MatMul, LayerNormalization and GELU, and "
        "what does refinement move? The tests' tiny ViT and ConvNeXt (tests/zoo.py, random weights), 64 "
        "standard-normal calibration images, 200 reconstruction iterations per unit (`RefineConfig(iters=200, "
        "batch_size=16)`) or QAT steps, the trained simulation against the file on the calibration images "
        "(`fidelity`), the file against the float model on 512 fresh standard-normal images. A check of the "
        "machinery, not an accuracy figure.", "",
        f"Command: `python benchmarks/transformer_fidelity.py --record`; measured {time.strftime('%Y-%m-%d')} on "
        f"{platform.platform()} ({_cpu_name()}), {seconds:.0f} s; versions: {versions}.", "",
        *table, ""])
    RECORD_SECTIONS["transformers"].write_text(section)
    results = HERE / "RESULTS.md"
    text = results.read_text()
    heading = f"\n{HEADING}\n"
    if heading in text:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + text[end if end >= 0 else len(text):]
    results.write_text(text.rstrip("\n") + "\n\n" + section)
    print(f"wrote {RECORD_SECTIONS['transformers']} and its section of {results}", file=sys.stderr)


if __name__ == "__main__":
    main()
