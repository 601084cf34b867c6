"""The benchmark of record: every manifest model × bits × calibration source.

Writes ``benchmarks/RESULTS.md`` (tables, machine, device, versions, the exact command),
``benchmarks/results.json`` and, when matplotlib is installed (``pip install -e .[bench]``),
``benchmarks/results.png`` (top-1 by method and bits). Needs ../shared (models, images)
and the EfficientNet-Lite0 export (models/export_efficientnet_lite0.py).

Profiles: ``paper`` = 500 synthesis iterations at full resolution (the papers' setting;
meant for a GPU), ``cpu`` = what a 2-core CPU finishes in reasonable time: 500 iterations
for the 32-px CIFAR models, 100 (the first 75 at 128 px) for the 224-px ImageNet models;
``gpu`` = what one GPU finishes in minutes (synthetic sets of 256 samples, 500 full-size
iterations, reconstruction 2000 iterations per block). Tables of a profile other than ``cpu``
are kept as ``<model>@<profile>``.

On a machine without the labelled images (a lent GPU), ``--pack DIR`` first copies what the
runs of --models need from ../shared (the models, only the calibration files of each data set)
to DIR; there ``DSGONNX_SHARED`` names DIR, ``--defer-scoring`` leaves every quantized model
unscored under ``--out``/models, and ``--score`` scores them back where the data is:

    python benchmarks/run_all.py --models efficientnet_lite0 --pack .gpu/shared   # here
    DSGONNX_SHARED=.gpu/shared python benchmarks/run_all.py --profile gpu --device cuda \
        --models efficientnet_lite0 --bits 4 --sources dsg-batch+refine --defer-scoring --out OUT
    python benchmarks/run_all.py --models "" --score OUT      # here, with ../shared

    python benchmarks/run_all.py --profile cpu
    python benchmarks/run_all.py --profile cpu --models cifar10_resnet20 --seeds 0,1,2
    python benchmarks/run_all.py --profile cpu --models cifar10_resnet20 --bits 6,4 --sources real+refine,dsg+refine
    python benchmarks/run_all.py --profile cpu --models mobilenet_v1_0.25 --bits w4a8,w8a4 --sources real,dsg

``--bits``: widths B (weights and activations at B bits) or wWaA where they differ (a column W4A8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = Path(os.environ.get("DSGONNX_SHARED", ROOT.parent / "shared")).resolve()
sys.path.insert(0, str(HERE))

from quant_table import (SOURCES, VARIANTS, bits_label, is_bits_key, markdown, parse_bits, parse_row,  # noqa: E402
                         run_table, score_pending, widths)

# name -> model path, data, preprocessing (preset, overrides), input size class
MANIFEST = {
    "cifar10_resnet20": (SHARED / "models/cifar10_resnet20.onnx", SHARED / "datasets/cifar10-test",
                         ("imagenet", {"resize": 32, "crop": 32}), "small"),
    "cifar10_resnet56": (SHARED / "models/cifar10_resnet56.onnx", SHARED / "datasets/cifar10-test",
                         ("imagenet", {"resize": 32, "crop": 32}), "small"),
    "efficientnet_lite0": (ROOT / "models/efficientnet_lite0.onnx", SHARED / "datasets/imagenet-samples",
                           ("tf-lite", {}), "large"),
    "mobilenet_v1_0.25": (SHARED / "models/imagenet_mobilenet_v1_0.25.onnx", SHARED / "datasets/imagenet-samples",
                          ("inception", {}), "large"),
    "mobilenet_v1_0.75": (SHARED / "models/imagenet_mobilenet_v1_0.75.onnx", SHARED / "datasets/imagenet-samples",
                          ("inception", {}), "large"),
    # float16, opset 7, no BN (quantized through a float32 opset-13 twin): BN-free sources only
    "squeezenet1.1_fp16": (SHARED / "models/imagenet_squeezenet1.1_fp16_nobn.onnx", SHARED / "datasets/imagenet-samples",
                           ("none", {"mean": (104, 117, 123), "std": (1, 1, 1), "channel_order": "BGR"}), "large"),
}
# BN folded into the convolutions, as vendors ship models (models/fold_bn.py, models/export_efficientnet_lite0.py):
# "<name>.folded" is MANIFEST[name] with the folded file; the row dsg-kept synthesizes on the BN-kept file
FOLDED = {
    "cifar10_resnet20": ROOT / "models/cifar10_resnet20.folded.onnx",
    "mobilenet_v1_0.25": ROOT / "models/mobilenet_v1_0.25.folded.onnx",
    "efficientnet_lite0": ROOT / "models/efficientnet_lite0.folded.onnx",
}
MANIFEST.update({f"{name}.folded": (path, *MANIFEST[name][1:]) for name, path in FOLDED.items()})
PROFILES = {
    "paper": {"small": {"iters": 500, "refine": {"method": "brecq", "iters": 2000}, "qat": {"iters": 10000}},
              "large": {"iters": 500, "refine": {"method": "brecq", "iters": 2000}, "qat": {"iters": 10000}}},
    # QAT on the CPU: 600 steps at the library's rate and loss (Adam 1e-4, squared logit difference)
    "cpu": {"small": {"iters": 500, "refine": {"method": "brecq", "iters": 500},
                      "qat": {"iters": 600, "generator_warmup": 200}},
            "large": {"iters": 100, "synth": {"low_res": 128}, "refine": {"method": "brecq", "iters": 100, "batch_size": 16},
                      "qat": {"iters": 200, "batch_size": 16, "generator_warmup": 100}}},
    # one GPU, minutes per model: synthetic sets of 256 (real calibration stays at --num-samples,
    # which fixes the held-out split), the papers' 500 full-size synthesis iterations
    # (QAT: 2000 steps of 64, stopped after 240 s so that a row fits one visit of the lent GPU)
    "gpu": {"small": {"iters": 500, "synth_samples": 256, "refine": {"method": "brecq", "iters": 2000},
                      "qat": {"iters": 2000, "time_budget": 240}},
            "large": {"iters": 500, "synth_samples": 256, "refine": {"method": "brecq", "iters": 2000},
                      "qat": {"iters": 2000, "time_budget": 240}}},
}


def _versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    from dsgonnx import __version__

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"dsgonnx": __version__, "commit": commit, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0]}


def _ran_on(results: dict) -> dict:
    """``{command: machine}`` for the commands of ``results`` whose machine is known: those
    recorded in ``ran_on``, or a single run's one command (a section merged before 2026-12-06
    kept one ``machine`` for all its commands, which is known for none of them)."""
    commands = results.get("commands", [])
    if "ran_on" in results:
        return dict(results["ran_on"])
    return {commands[0]: results["machine"]} if len(commands) == 1 and results.get("machine") else {}


def _machines(results: dict) -> list[str]:
    """Every machine a section's rows ran on, in the order of its commands; a section
    merged before the commands carried their machine also names the one it recorded."""
    ran_on = _ran_on(results)
    unknown = any(command not in ran_on for command in results.get("commands", []))
    legacy = [results["machine"]] if unknown and results.get("machine") else []
    return list(dict.fromkeys(legacy + [ran_on[c] for c in results.get("commands", []) if c in ran_on]))


def _merged(previous, results: dict) -> dict:
    """A run of some sources only (e.g. the refine rows) adds to the table of the same
    profile and evaluation set, and a run of some bit widths replaces only those cells of a
    row; otherwise it replaces the table. Each command keeps the machine it ran on."""
    if not previous or previous.get("profile") != results.get("profile") or \
            previous.get("eval_images") != results.get("eval_images"):
        return dict(results, ran_on=_ran_on(results))
    rows = dict(previous["rows"])
    for row, new in results["rows"].items():
        old = rows.get(row, {})
        cells = {key: {**old[key], **value} for key, value in new.items()  # per bit width: top1, agreement, ...
                 if isinstance(value, dict) and isinstance(old.get(key), dict) and all(map(is_bits_key, value))}
        rows[row] = {**old, **new, **cells}
    results = dict(results, notes=list(dict.fromkeys(previous.get("notes", []) + results.get("notes", []))),
                   wall_seconds=previous.get("wall_seconds", 0) + results.get("wall_seconds", 0),
                   commands=list(dict.fromkeys(previous.get("commands", []) + results.get("commands", []))),
                   ran_on={**_ran_on(previous), **_ran_on(results)},
                   # the section's first machine where its earlier commands' are unknown (see _machines)
                   machine=previous.get("machine") or results.get("machine"),
                   bits=sorted(set(previous["bits"]) | set(results["bits"]), key=widths, reverse=True))
    order = {row: (list(SOURCES).index(parse_row(row)[0]), len(parse_row(row)[1])) for row in rows}
    results["rows"] = {row: rows[row] for row in sorted(rows, key=lambda row: order[row])}
    return results


def _pack(folder: Path, names, num_samples: int) -> int:
    """Copy what the runs of ``names`` read from ../shared to ``folder``, in the same layout."""
    import shutil

    from dsgonnx.calibration_data import spread_indices
    from dsgonnx.preprocess import scan_image_folder

    for name in names:
        model, data, _, _ = MANIFEST[name]
        files = scan_image_folder(str(data)).files
        wanted = [model] + [Path(files[i]) for i in spread_indices(len(files), num_samples)]
        for path in (p for p in wanted if p.is_relative_to(SHARED)):
            target = folder / path.relative_to(SHARED)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        print(f"{name}: {model.name if model.is_relative_to(SHARED) else 'model not under ../shared (carry it)'} "
              f"and {num_samples} calibration files of {data.name} in {folder}", file=sys.stderr)
    return 0


def _gpu_name(results: dict) -> str:
    if not results["device"].startswith("cuda"):
        return ""
    import torch

    return f", {torch.cuda.get_device_name()}"


# sections other scripts measure, carried into RESULTS.md whenever it is written (name -> the
# markdown they wrote)
RECORD_SECTIONS = {"transformers": HERE / "transformer_fidelity.md"}


def _cpu_name() -> str:
    from dsgonnx.hardware import cpu_info

    return cpu_info().model or platform.machine()


def _chart(all_results: dict, path: Path) -> bool:
    if not all_results:  # (every model skipped: nothing to draw)
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(all_results)
    every = list(dict.fromkeys(source for results in all_results.values() for source in results["rows"]))
    palette = plt.get_cmap("tab20")  # one colour per row, the same in every panel
    colours = {source: palette(i % 20) for i, source in enumerate(every)}
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        results = all_results[name]
        bits = results["bits"]
        sources = list(results["rows"])
        width = 0.8 / len(sources)
        for i, source in enumerate(sources):
            cells = [results["rows"][source]["top1"].get(str(b), (float("nan"), 0.0)) for b in bits]
            means, stds = [c[0] for c in cells], [c[1] for c in cells]
            ax.bar([j + i * width for j in range(len(bits))], means, width, yerr=stds, label=source,
                   color=colours[source])
        ax.axhline(results["fp32"]["top1"], color="black", linewidth=0.8, linestyle="--", label="FP32")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(bits))], [bits_label(b) for b in bits])
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("top-1 %")
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 10), fontsize=7)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--models", default=",".join(MANIFEST))
    parser.add_argument("--bits", default="8,6,4",
                        help="widths: B (weights and activations at B bits) or wWaA where they differ, e.g. 8,6,4,w4a8")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"rows to run: {', '.join(SOURCES)}, each optionally with variants "
                             f"+{', +'.join(VARIANTS)} (e.g. dsg+mixed)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md, results.json, results.png")
    parser.add_argument("--calib-cache", metavar="DIR", help="reuse synthetic sets made with the same settings from DIR")
    parser.add_argument("--merge", metavar="JSON", help="add the rows of another run's results.json (e.g. one run "
                        "beside this on another machine) to --out, then write the tables; use with --models ''")
    parser.add_argument("--defer-scoring", action="store_true",
                        help="keep the quantized models unscored under --out/models (a machine without the labelled "
                             "images); score them with --score")
    parser.add_argument("--pack", metavar="DIR", help="copy the files of ../shared the --models' runs need on a "
                        "machine without ../shared (their models, the calibration files of their data) to DIR, and stop")
    parser.add_argument("--score", metavar="DIR", help="score the models a --defer-scoring run left in DIR on the "
                        "held-out images here, then add its rows to --out as --merge does; use with --models ''")
    args = parser.parse_args(argv)

    from dsgonnx.preprocess import preprocess_from_preset

    if not SHARED.is_dir():
        print(f"benchmarks need {SHARED} (models and labelled images)", file=sys.stderr)
        return 2
    if args.pack:
        return _pack(Path(args.pack), filter(None, args.models.split(",")), args.num_samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    all_results = json.loads(json_path.read_text()) if json_path.exists() else {}
    started = time.time()
    if args.merge:
        for name, results in json.loads(Path(args.merge).read_text()).items():
            all_results[name] = _merged(all_results.get(name), results)
        json_path.write_text(json.dumps(all_results, indent=2))
    if args.score:
        for key, results in json.loads((Path(args.score) / "results.json").read_text()).items():
            if "pending" in results:
                model, data, (preset, overrides), _ = MANIFEST[key.split("@")[0]]
                start = time.time()
                folder = Path(args.score) / "models" / key
                if not folder.is_dir():  # kept before each model had its own folder
                    folder = Path(args.score) / "models"
                score_pending(results, folder, str(model), str(data), preprocess_from_preset(preset, **overrides))
                command = f"python benchmarks/{Path(__file__).name} " + " ".join(argv if argv is not None else sys.argv[1:])
                here = f"{platform.platform()} ({_cpu_name()})"
                results.update(commands=results.get("commands", []) + [command], ran_on={**_ran_on(results), command: here},
                               scored=f"{here}, {round(time.time() - start)} s")
            all_results[key] = _merged(all_results.get(key), results)
        json_path.write_text(json.dumps(all_results, indent=2))
    for name in filter(None, args.models.split(",")):
        model, data, (preset, overrides), size = MANIFEST[name]
        if not model.exists():
            print(f"skipping {name}: {model} not found (run models/export_efficientnet_lite0.py and "
                  "models/fold_bn.py)", file=sys.stderr)
            continue
        profile = PROFILES[args.profile][size]
        key = name if args.profile == "cpu" else f"{name}@{args.profile}"
        start = time.time()
        results = run_table(str(model), str(data), preprocess_from_preset(preset, **overrides),
                            bits=parse_bits(args.bits), sources=args.sources.split(","),
                            seeds=[int(s) for s in args.seeds.split(",")], num_samples=args.num_samples,
                            iters=profile["iters"], synth=profile.get("synth"), device=args.device,
                            refine=profile.get("refine"), qat=profile.get("qat"), cache=args.calib_cache,
                            twin=str(MANIFEST[name.removesuffix(".folded")][0]) if name.endswith(".folded") else None,
                            synth_samples=profile.get("synth_samples"),
                            # (each model its own folder: the files are named by row, seed and bits alone)
                            keep=out / "models" / key if args.defer_scoring else None)
        command = f"python benchmarks/{Path(__file__).name} " + " ".join(argv if argv is not None else sys.argv[1:])
        results.update(profile=args.profile, preprocess=[preset, overrides], wall_seconds=round(time.time() - start),
                       commands=[command], machine=f"{platform.platform()} ({_cpu_name()}{_gpu_name(results)})")
        all_results[key] = _merged(all_results.get(key), results)
        json_path.write_text(json.dumps(all_results, indent=2))  # keep what is done
    if args.defer_scoring:
        print(f"models kept unscored under {out / 'models'}; score them with: python benchmarks/{Path(__file__).name} "
              f"--models '' --score {out}", file=sys.stderr)
        return 0
    versions = _versions()
    chart = _chart(all_results, out / "results.png")
    if not chart and all_results and (out / "results.png").exists():  # (no matplotlib: the last chart drawn stays linked)
        chart = True
        print(f"{out / 'results.png'} not redrawn (matplotlib is not installed: pip install -e .[bench])", file=sys.stderr)
    lines = [
        "# Benchmark results",
        "",
        f"Last written {time.strftime('%Y-%m-%d')} on {platform.platform()} ({_cpu_name()}); versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". Each model's section names the commands "
        "that produced it and the machines they ran on: where those are several, each command its own "
        "(recorded since 2026-12-06; a section merged before then names the one machine it recorded, "
        "which other commands of it may not have run on).",
        "",
        "Each row calibrates the same ONNX Runtime quantizer (QDQ, per-channel int8/INT4 weights, "
        "uint8/UINT4 activations, MinMax ranges, last layer kept float) on one source: `real` = "
        f"{args.num_samples} labelled images spread evenly over the data set (every k-th file), "
        "left out of the evaluation; `gaussian` = N(0,1) noise; `zeroq`, `dsg-nosci`, `dsg` = "
        "synthetic images (dsgonnx synthesize) in the model's pixel range; `dsg-ce`, `dsg-ce100`, `dsg-full`, "
        "`dsg-norm`, `dsg-batch`, `dsg-batch-ce10`, `dsg-batch-proc`, `dsg-batch-i500` = DSG with, in turn, "
        "cross-entropy to a random class per image (weight 1, 100), no low-resolution schedule, gaps in units of the BN std "
        "(`--normalize-gaps`), the batch's pooled statistics aligned (`--alignment batch`), that with "
        "cross-entropy weight 10 (README, 'What the DSG images lack for QAT'), and that started from dead-leaves "
        "images instead of noise (`--start procedural`), and `dsg-batch` with 500 iterations all at full size "
        "whatever the profile's (the GPU profile's synthesis); `dsg-batch-jit`, `dsg-batch-tv` = `dsg-batch` with "
        "DeepInversion's jitter (`--jitter`), with a total-variation prior (`--tv-weight 0.5`); `dsg-batch-gen` = "
        "`dsg-batch` with each batch's images a fresh generator's output, generator and latents learned "
        "(Genie's parameterisation, `--generator`), `dsg-batch-swing` = `dsg-batch` with each strided convolution's "
        "input shifted by up to a pixel each step (Genie's swing convolution, `--swing`), `dsg-batch-proc-swing` = "
        "that from dead-leaves images, `dsg-batch-genie` = generator and swing (Genie's data distillation), "
        "`dsg-batch-proc-lr01`, `dsg-batch-proc-lr03` = `dsg-batch-proc` at a pixel learning rate of 0.01, 0.03 "
        "(`--lr`; 0.1 by default), `dsg-batch-proc-nosci` = `dsg-batch-proc` without sample correlation "
        "inhibition (`--no-sci`). Top-1 on the held-out "
        "images, change vs FP32 in points; several seeds give mean ± std; after `·`, where it was recorded, "
        "top-1 agreement with the FP32 model in % (results.json also holds the logit SQNR, `sqnr_db`): on "
        "900 images top-1 moves by whole images, agreement less so. Rows `<source>+<variant>` use the "
        "same calibration images with other settings: `+refine` reconstruction PTQ (`dsgonnx quantize "
        "--refine`), `+nobc` without bias correction (`--bias-correction off`; the default is `auto` since "
        "it was measured), `+empbc` with every layer's input mean measured on the calibration images "
        "(`--bias-correction empirical`; `auto` reads it from the BN statistics where they reach a layer), "
        "`+cle` cross-layer equalization (`--cle`), `+mixed` the most sensitive tensors at "
        "8 bits (`--mixed auto`, 5 % of the weight values). Runs made side by side "
        "with `--out` elsewhere are combined with `--merge`; where runs shared the CPU, seconds are indicative.",
        "",
    ]
    folded_intro = [
        "## BN folded", "",
        "Most ONNX files users receive have BatchNorm folded into Conv (both torch exporters, ORT's optimiser "
        "and tf2onnx do it), so they carry no BN statistics for DSG or ZeroQ. These sections quantize the folded "
        "twins of three benchmark models (models/fold_bn.py, models/export_efficientnet_lite0.py; FP32 parity "
        "with the BN-kept file checked on real images) with every BN-free source: `gaussian`, `procedural` "
        "(dead-leaves images, `--calib procedural`, what `--calib auto` picks for a model without BN), "
        "`inversion` (from procedural images: cross-entropy to random classes with every Conv output held to "
        "the statistics of the start images, total variation, jitter, SCI), "
        "`real`, and `dsg-kept`, DSG images synthesized on the BN-kept twin (the upper reference: what a user "
        "with the BN-kept file gets).", ""]
    for name, results in sorted(all_results.items(), key=lambda item: item[0].endswith(".folded")):
        profile = results.get("profile", "?")
        synth = results.get("synth") or {}
        machines, ran_on = _machines(results), _ran_on(results)
        # each command's machine, where the section's runs used several and it was recorded
        where = {c: f" (on {ran_on[c]})" for c in ran_on} if len(machines) > 1 else {}
        if name.endswith(".folded") and folded_intro:
            lines += folded_intro
            folded_intro = []
        lines += [f"{'###' if name.endswith('.folded') else '##'} {name}", "",
                  f"Profile `{profile}`: {results['iters']} synthesis iterations"
                  + (f", the first 75% at {synth['low_res']} px" if synth.get("low_res") else "")
                  + f", {results['num_samples']} calibration samples"
                  + (f" ({results['synth_samples']} in each synthetic set)" if results.get("synth_samples") else "")
                  + f", seeds {results['seeds']}, synthesis on "
                  f"{results['device']}, ONNX Runtime {', '.join(results.get('providers', []))}; "
                  f"wall time {results.get('wall_seconds', '?')} s on {' and '.join(machines) or '?'}"
                  + (" (each command below names its machine where it was recorded)" if where else "")
                  + (f"; scored on {results['scored']}" if results.get("scored") else "")
                  + ("; the quantized models run as written (`validate --exact`: no fused integer kernels, the "
                     "integer result of a CPU whose kernels cannot saturate)" if results.get("arithmetic") == "exact"
                     else "") + ".", "",
                  "Commands: " + "; ".join(f"`{c}`{where.get(c, '')}" for c in results.get("commands", [])), "",
                  *[line for note in results.get("notes", []) for line in (f"Note: {note}", "")],
                  *([f"Rows `…+refine`: the same calibration images, then reconstruction PTQ "
                     f"(`dsgonnx quantize --refine`) with {refined[0]}, starting where quantize without "
                     "`--refine` is (`--refine-start auto`: SQuant's rounding at 4 bits or fewer, else nearest; "
                     "nearest rounding in the W4A4 cells the notes say were measured before that default, and in "
                     "rows `…+refine+nearstart`), from SQuant's rounding in rows `…+refine+sqstart`; rows `…+lsq` "
                     "learn the activation steps too (`--refine-act-lr 1e-3`), rows `…+wstep` each layer's weight steps "
                     "(`--refine-weight-step-lr 1e-3`, Genie-M's; the default with real images since 2026-12-05), rows "
                     "`…+nowstep` keep the clipping-searched ones (`--refine-weight-step-lr 0`), rows `…+views4` reconstruct on each "
                     "image and 3 flipped and shifted copies of it (`--refine-views 4`), rows `…+it500` and `…+it2000` take 500 "
                     "and 2000 iterations per block whatever the profile's (`--refine-iters 500`, `2000`), rows "
                     "`…+qdropin` mix each block's input with the float model's (`--refine-input-drop 0.5`, the default since "
                     "commit 9dc8c4a; the other rows were measured before it, without the mixing), rows `…+noqdropin` "
                     "do not (`--refine-input-drop 0`), rows `…+inside` simulate the bias correction while "
                     "reconstructing (`--refine-correct-inside`, the default since commit 13b536d; the "
                     "other rows were measured before it, correcting after reconstruction), rows `…+after` "
                     "correct after it only (`--refine-correct-after`); rows `…+inwritten` and `…+incalib` simulate "
                     "it with the written correction's means or the calibration images' (`--refine-inside-means`; "
                     "the default `auto` takes the calibration images' with synthetic images since commit "
                     "724b8ff, the written ones with real images, and since 2026-12-07 the written ones with "
                     "synthetic images too where the network has no depthwise convolutions: the ResNets' rows without "
                     "`+incalib` measured before then had the calibration images'); rows `…+pd` add PD-Quant's prediction difference to "
                     "each block's loss (`--refine-prediction-weight 10`, its code's weight, at temperature 4; rows "
                     "`…+pd+pdt1` at temperature 1, `--refine-prediction-temperature 1`).", ""]
                    if (refined := [json.dumps({k: v for k, v in r["refine"].items() if k != "start"})
                                    for r in results["rows"].values() if r.get("refine")]) else []),
                  *([f"Rows `…+qat`, `…+qatgen`, `…+qatgdfq`: calibrated on the same images, then quantization-aware "
                     f"training (`dsgonnx quantize --qat`) with {trained[0]} (less the data settings) on, in turn, those "
                     "images (flipped and shifted), a generator's fresh images trained with DSG's losses "
                     "(`--qat-data generator`), or with GDFQ's batch statistics (`--qat-generator-loss bns`); "
                     "training starts from SQuant's rounding at 4 bits or fewer (`--qat-start auto`), from nearest "
                     "rounding in rows `…+nearstart` and in the W4A4 cells the notes say were measured before "
                     "commit 4c40750, from reconstruction's result in rows `…+refstart` (`--qat-start refine`, "
                     "reconstructed with the profile's refine settings); the logits alone are distilled "
                     "(`--qat-feature-weight 0`) but in the cells the notes say were measured at or after commit "
                     "07db876, where every trained layer's output is distilled too on networks without depthwise "
                     "convolutions (`auto`: weight 100), and in rows `…+featW` (weight W; rows `…+nofeat`: the "
                     "logits alone); the `synthesis s` column adds the training's seconds (and the reconstruction's).",
                     ""]
                    if (trained := [json.dumps({k: v for k, v in r["qat"].items()
                                                if k not in ("data", "generator_loss", "start")})
                                    for r in results["rows"].values() if r.get("qat")]) else []),
                  markdown(results), ""]
    if chart:
        lines += ["![top-1 by method and bits](results.png)", ""]
    lines += [path.read_text() for path in RECORD_SECTIONS.values() if path.exists()]
    (out / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {out / 'RESULTS.md'} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
