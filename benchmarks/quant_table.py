"""Top-1 of a model quantized at several bit widths, calibrated on real or synthetic data.

For each calibration source (real images from a split disjoint from evaluation, Gaussian
noise, ZeroQ, DSG without SCI, DSG) the images are made once per seed and the same ONNX
Runtime quantizer settings are applied at each bit width; accuracy is measured with
dsgonnx's validation on the held-out labelled images. Prints a Markdown table and writes
the figures as JSON.

Example (CIFAR-10 ResNet-20, paper settings, CPU):
    python benchmarks/quant_table.py ../shared/models/cifar10_resnet20.onnx \\
        --data ../shared/datasets/cifar10-test --preprocess imagenet --resize 32 --crop 32 \\
        --iters 500 --num-samples 100 --json /tmp/r20.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {
    "real": None,
    "gaussian": {"method": "gaussian"},
    "procedural": {"method": "procedural"},
    "inversion": {"method": "inversion"},
    "zeroq": {"method": "zeroq"},
    "dsg-nosci": {"method": "dsg", "sci": False},
    "dsg": {"method": "dsg"},
    "dsg-ce": {"method": "dsg", "ce_weight": 1.0},  # DSG plus cross-entropy to a random class per image
    "dsg-ce100": {"method": "dsg", "ce_weight": 100.0},  # the same, weighted to make the images class-confident
    # the batch's pooled statistics held to the BN ones (DeepInversion's, GDFQ's), each sample free
    "dsg-batch": {"method": "dsg", "alignment": "batch"},
    "dsg-batch-ce10": {"method": "dsg", "alignment": "batch", "ce_weight": 10.0},  # and class-confident images
    "dsg-batch-proc": {"method": "dsg", "alignment": "batch", "start": "procedural"},  # from dead-leaves images
    # the images a generator's output G(z), generator and latents learned per batch (Genie's parameterisation)
    "dsg-batch-gen": {"method": "dsg", "alignment": "batch", "generator": True},
    # and every strided convolution's input shifted by up to a pixel each step: Genie's data distillation (Genie-D)
    "dsg-batch-genie": {"method": "dsg", "alignment": "batch", "generator": True, "swing": True},
    "dsg-batch-swing": {"method": "dsg", "alignment": "batch", "swing": True},  # the swing alone, on the pixels
    # from leaves at a pixel rate of 0.01 / 0.03 instead of 0.1: the leaves' spatial correlation kept
    "dsg-batch-proc-lr01": {"method": "dsg", "alignment": "batch", "start": "procedural", "lr": 0.01},
    "dsg-batch-proc-lr03": {"method": "dsg", "alignment": "batch", "start": "procedural", "lr": 0.03},
    # without DSG's sample correlation inhibition (`--no-sci`), from leaves (slack and LSE act on
    # per-sample alignment only: with the batch's, `--no-slack`/`--no-lse` make the same images)
    "dsg-batch-proc-nosci": {"method": "dsg", "alignment": "batch", "start": "procedural", "sci": False},
    "dsg-batch-proc-swing": {"method": "dsg", "alignment": "batch", "start": "procedural", "swing": True},  # from leaves
    "dsg-batch-jit": {"method": "dsg", "alignment": "batch", "jitter": True},  # each step on a shifted, mirrored batch
    "dsg-batch-tv": {"method": "dsg", "alignment": "batch", "tv_weight": 0.5},  # and a total-variation prior
    # dsg-batch with the GPU profile's synthesis budget whatever the profile: 500 iterations, all at full size
    "dsg-batch-i500": {"method": "dsg", "alignment": "batch", "low_res": 0, "iters": 500},
    # dsg-batch-proc against a companion model's BN statistics too (MixMix's feature mixing; `--mix-model`),
    # the companion a file in the model's own folder (the other MobileNet v1 of ../shared/models), else in models/
    "dsg-batch-proc-mix075": {"method": "dsg", "alignment": "batch", "start": "procedural",
                              "mix_models": ("imagenet_mobilenet_v1_0.75.onnx",)},
    "dsg-batch-proc-mix025": {"method": "dsg", "alignment": "batch", "start": "procedural",
                              "mix_models": ("imagenet_mobilenet_v1_0.25.onnx",)},
    "dsg-batch-proc-mixlite0": {"method": "dsg", "alignment": "batch", "start": "procedural",
                                "mix_models": ("efficientnet_lite0.onnx",)},  # (models/, beside MobileNet's files)
    "dsg-norm": {"method": "dsg", "normalize_gaps": True},  # DSG with BN gaps in units of the running std
    "dsg-full": {"method": "dsg", "low_res": 0},  # DSG at full resolution throughout (no low-res schedule)
    "dsg-kept": {"method": "dsg"},  # DSG images made on the model's BN-kept twin (``twin=``), for a folded model
}
# "<source>+<variant>[+<variant>]": the same calibration images, quantized with other settings
VARIANTS = {
    "refine": {},  # reconstruction PTQ (quantize --refine; settings from ``refine=``)
    "nobc": {"bias_correction": "off"},  # no bias correction (the default before it)
    "empbc": {"bias_correction": "empirical"},  # every layer's input mean measured on the calibration images
    "cle": {"cle": True},  # cross-layer equalization
    "mixed": {"mixed": True},  # the most sensitive 5 % of the weights at 8 bits (simulated widths only)
    "calpool": {"pool_range": "calibrated"},  # pooled features on their own calibrated range (the default before)
    "nofirst": {"first_layer_8bit": False},  # input and first layer at the low width too (below 8 bits)
    "lsq": {},  # with +refine: the activation steps learned too (quantize --refine-act-lr LSQ_LR)
    "wstep": {},  # with +refine: each layer's weight steps learned too (quantize --refine-weight-step-lr WSTEP_LR)
    "nowstep": {},  # with +refine: the clipping-searched weight steps (--refine-weight-step-lr 0; real rows before 2026-12-05's default)
    "views4": {},  # with +refine: each calibration image and 3 flipped/shifted views of it (quantize --refine-views 4)
    "it500": {},  # with +refine: 500 iterations per block whatever the profile's (quantize --refine-iters 500)
    "it2000": {},  # with +refine: 2000 iterations per block (quantize --refine-iters 2000)
    "qdropin": {},  # with +refine: QDrop's mixing of each block's input with the float one (quantize --refine-input-drop 0.5)
    "noqdropin": {},  # with +refine: the quantized prefix's input alone (--refine-input-drop 0; the default before 9dc8c4a)
    "inside": {},  # with +refine: the bias correction simulated while reconstructing (--refine-correct-inside)
    "after": {},  # with +refine: the bias correction applied after reconstruction only (--refine-correct-after)
    "inwritten": {},  # with +refine: the simulated correction with the written means (--refine-inside-means written)
    "incalib": {},  # with +refine: ... with the calibration images' means (--refine-inside-means calibration)
    "pd": {},  # with +refine: PD-Quant's prediction difference added to each block's loss (--refine-prediction-weight PD_WEIGHT)
    "pdt1": {},  # with +refine+pd: its softmax at temperature 1 (PD-Quant's for MobileNetV2) instead of 4
    "squant": {"rounding": "squant"},  # SQuant's data-free flips instead of nearest rounding
    "nearest": {"rounding": "nearest"},  # nearest rounding where the default (auto) is SQuant's (4 bits or fewer)
    "nofallback": {"fallback": False},  # with +refine/+qat*: the learned model even where plain rounding is closer
    # activation ranges (the default, auto, is mse at 4 bits or fewer, else minmax): the observed
    # min/max, the least expected squared error on histograms, ORT's percentile, the least KL divergence
    "minmax": {"calibrator": "minmax"},
    "mse": {"calibrator": "mse"},
    "percentile": {"calibrator": "percentile"},
    "entropy": {"calibrator": "entropy"},  # KL divergence of the quantized histogram (TensorRT's), 2048 bins
    # quantization-aware training (quantize --qat; settings from ``qat=``) on: the calibration images
    # themselves, a generator trained with DSG's losses, or one trained with GDFQ's BN statistics
    "qat": {},
    "qatgen": {},
    "qatgdfq": {},
    # with +qat* or +refine: where training starts (the default of both, auto, is SQuant's rounding at
    # 4 bits or fewer, else nearest)
    "sqstart": {},  # SQuant's rounding (quantize --qat-start/--refine-start squant)
    "nearstart": {},  # nearest rounding (quantize --qat-start/--refine-start nearest; QAT's default before 4c40750)
    "refstart": {},  # reconstruction's result, with the profile's refine settings (quantize --qat-start refine)
    # with +qat*: the library's own step count for the device (--qat-iters unset: 2000 on CPU), not the profile's
    "defaultsteps": {},
    "mixup": {},  # with +qat*: half of each batch blended pairwise (quantize --qat-mix mixup)
    "cutmix": {},  # the same with a box of the other image (quantize --qat-mix cutmix)
    # with +qat*: every trained layer's output distilled too, with weight 10, 30, 100, 300 (quantize --qat-feature-weight W)
    "feat10": {},
    "feat30": {},
    "feat100": {},
    "feat300": {},
    "nofeat": {},  # with +qat*: the logits alone (quantize --qat-feature-weight 0; the default before it was auto)
    # with +refine/+qat*/+squant: every model the fallback weighed is kept (quantize --keep-candidates)
    # and scored on the held-out images too, the written one marked
    "cands": {},
    # the fallback's independent probe (quantize --fallback-probes): 32 inversion images made with the
    # profile's iterations and synthesis settings, instead of (+invprobe) or beside (+bothprobes) procedural ones
    "invprobe": {"fallback_probes": ("inversion",)},
    "bothprobes": {"fallback_probes": ("procedural", "inversion")},
    "noprobe": {"fallback_probes": ()},  # the held-out samples (else the calibration images) alone
    # procedural images beside the held-out samples (the rule before commit e6035b8 for DSG sets)
    "procprobe": {"fallback_probes": ("procedural",)},
    # a synthetic set made with HELD_OUT samples more (dsgonnx synthesize --holdout), which quantize
    # checks its models on (+held), or the same set's calibration images alone: the fallback checks on
    # them (+heldaside; as every synthetic row without +held, whose sets are made without); real+held:
    # HELD_OUT of the files not calibrated on held out (quantize's default since real folders hold out), the
    # other real rows with --holdout 0
    "held": {},
    "heldaside": {},
    "held64": {},  # real rows: HELD_MANY of the files not calibrated on held out (quantize --holdout 64)
    # a synthetic set of LARGE_SET samples (the real calibration, and so the scoring split, unchanged)
    "s256": {},
    # real rows: a handful of photos, 8/16/32 of the real calibration files (spread over them), with
    # +held/+held64 that many others of them held out; the images scored stay every row's
    **{f"few{count}": {} for count in (8, 16, 32)},
}
HELD_OUT = 16
HELD_MANY = 64  # the most held-out samples the fallback uses (dsgonnx.pipeline.FALLBACK_SAMPLES)
LARGE_SET = 256
QAT_DATA = {"qat": {"data": "calib"}, "qatgen": {"data": "generator", "generator_loss": "dsg"},
            "qatgdfq": {"data": "generator", "generator_loss": "bns"}}
QAT_VARIANTS = {"sqstart": {"start": "squant"}, "nearstart": {"start": "nearest"}, "refstart": {"start": "refine"},
                "defaultsteps": {"iters": None},
                "mixup": {"mix": "mixup"}, "cutmix": {"mix": "cutmix"},
                "nofeat": {"feature_weight": 0.0},
                **{f"feat{w}": {"feature_weight": float(w)} for w in (10, 30, 100, 300)}}
LSQ_LR = 1e-3
WSTEP_LR = 1e-3
PD_WEIGHT = 10.0  # PD-Quant's (its code: KL / λ_r, λ_r = 0.1)
SIMULATED = (2, 3, 5, 6, 7)  # the widths quantize simulates in 8-bit containers
# where a variant changes anything, by (weight bits, activation bits): mixed precision acts among
# simulated widths, the 8-bit first layer where a side is below 8 bits
ONLY_AT = {"mixed": lambda w, a: w in SIMULATED or a in SIMULATED, "nofirst": lambda w, a: min(w, a) < 8}
_WIDTHS = re.compile(r"w(\d+)a(\d+)")


def parse_bits(spec: str) -> list:
    """``--bits``: comma-separated widths, each ``B`` (weights and activations at B bits, kept as
    the int B: a table's keys "8", "6", "4" as before) or ``wWaA`` where they differ (kept as
    "w4a8"; ``w4a4`` is 4), for the per-side figures that tell the weights' share of a loss
    from the activations'. Anything else exits with one line."""
    keys = []
    for token in filter(None, (t.strip().lower() for t in spec.split(","))):
        matched = _WIDTHS.fullmatch(token)
        if not (token.isdigit() or matched):
            raise SystemExit(f"--bits: {token!r} is neither a width B nor wWaA (e.g. 4 or w4a8)")
        w, a = (int(token), int(token)) if token.isdigit() else (int(matched[1]), int(matched[2]))
        keys.append(w if w == a else f"w{w}a{a}")
    return keys


def widths(key) -> tuple[int, int]:
    """(weight bits, activation bits) of a table's bit-width key (4, "4" or "w4a8")."""
    if isinstance(key, int) or str(key).isdigit():
        return int(key), int(key)
    matched = _WIDTHS.fullmatch(str(key))
    if matched is None:
        raise ValueError(f"not a bit-width key: {key!r}")
    return int(matched[1]), int(matched[2])


def is_bits_key(key: str) -> bool:
    return key.isdigit() or _WIDTHS.fullmatch(key) is not None


def bits_label(key) -> str:
    w, a = widths(key)
    return f"W{w}A{a}"


def parse_row(row: str) -> tuple[str, list[str]]:
    base, *variants = row.split("+")
    if base not in SOURCES or any(v not in VARIANTS for v in variants):
        raise SystemExit(f"unknown row {row!r}: sources {', '.join(SOURCES)}, variants +{', +'.join(VARIANTS)}")
    return base, variants


def held_out(loaded, data, recipe, num_samples: int, max_eval=None):
    """The images (and labels) of ``data`` a table scores on: all but the ``num_samples`` files
    quantize's real-data calibration picks from the folder, thinned evenly to ``max_eval``."""
    from dsgonnx.validation.data import open_dataset

    folder, calib = _calibration_files(data, num_samples)
    calib_files = frozenset(calib)
    excluded = set(calib_files)
    if max_eval:
        rest = [f for f in folder.files if f not in calib_files]
        keep = set(rest[:: max(1, len(rest) // max_eval)][:max_eval])
        excluded |= set(rest) - keep
    held = open_dataset(loaded.input, data, recipe, exclude_files=frozenset(excluded))
    return held.batch(0, held.size), held.labels


def _calibration_files(data, num_samples: int):
    """The scanned folder ``data`` and the ``num_samples`` files of it quantize's real-data
    calibration picks (spread evenly over the sorted files), in folder order."""
    from dsgonnx.calibration_data import spread_indices
    from dsgonnx.preprocess import scan_image_folder

    folder = scan_image_folder(data)
    return folder, [folder.files[i] for i in spread_indices(len(folder.files), num_samples)]


def handful(loaded, data, recipe, num_samples: int, count: int, holdout: int):
    """``count`` of the ``num_samples`` files a table's real rows calibrate on, spread over them,
    and ``holdout`` others of them held out (none for 0), as one in-memory set of real images:
    the images a table scores (:func:`held_out`) are not among them."""
    import numpy as np

    from dsgonnx import SyntheticSet
    from dsgonnx.calibration_data import spread_indices, unused_indices
    from dsgonnx.validation.data import open_dataset

    folder, calib = _calibration_files(data, num_samples)
    if count + holdout > len(calib):
        raise SystemExit(f"{count} calibration and {holdout} held-out images need more than the {len(calib)} "
                         "calibration files")
    images = open_dataset(loaded.input, data, recipe, exclude_files=frozenset(set(folder.files) - set(calib)))
    images = images.batch(0, images.size)
    held = spread_indices(len(calib), holdout) if holdout else np.arange(0)
    return SyntheticSet(images[unused_indices(len(calib), held, count)], {"method": "real"},
                        images[held] if holdout else None)


def run_table(model, data, recipe, *, bits=(8, 6, 4), sources=tuple(SOURCES), seeds=(0,), num_samples=100,
              iters=500, synth=None, calibrator="auto", logits="exclude", device="auto", max_eval=None,
              refine=None, qat=None, cache=None, twin=None, synth_samples=None, keep=None, log=sys.stderr) -> dict:
    """Quantize ``model`` for every (row, seed, bits) and score it on ``data``.

    A row is a calibration source with optional variants (``dsg+mixed``); rows of one source
    share its images (made once per seed). The held-out images are decoded once.
    ``refine``: {"method": "brecq", **RefineConfig fields} for the ``+refine`` rows; ``qat``:
    QatConfig fields for the ``+qat``/``+qatgen``/``+qatgdfq`` rows. ``cache``: a
    folder of synthetic sets; a set made with the same settings is loaded from it (its synthesis
    seconds are those recorded when it was made), a new one is saved there. ``twin``: the BN-kept
    file of a folded ``model``, on which the ``dsg-kept`` row synthesizes. ``synth_samples``: the
    synthetic sets' size (default ``num_samples``, which stays the real calibration's and so fixes the
    held-out split). ``keep``: a folder to leave every quantized model (and kept candidate) in,
    unscored, listed in ``results["pending"]`` for :func:`score_pending` (a run on a machine
    without the labelled images, e.g. a lent GPU; ``data`` then needs only the calibration files)."""
    import numpy as np
    import torch

    from dsgonnx import (QatConfig, QuantConfig, RefineConfig, SynthConfig, SynthMethod, SynthOptions, SyntheticSet,
                         ValidateConfig, quantize, synthesize, validate)
    from dsgonnx.config import REFINE_STARTS
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.graph.to_torch import resolve_device

    loaded = load_model(model)
    held_images, held_labels = held_out(loaded, data, recipe, num_samples, max_eval) if keep is None else (None, None)
    results = {"model": str(model), "bits": list(bits), "seeds": list(seeds), "num_samples": num_samples,
               "iters": iters, "synth": synth or {}, "calibrator": calibrator, "logits": logits,
               "device": str(resolve_device(device)), "rows": {},
               **({"synth_samples": synth_samples} if synth_samples else {})}
    if keep is not None:
        Path(keep).mkdir(parents=True, exist_ok=True)
        results["pending"] = []
    made: dict = {}  # (source, seed) -> (calibration, synthesis seconds, s/iter, similarity)
    with tempfile.TemporaryDirectory() as scratch:
        for row in sources:
            base, variants = parse_row(row)
            runs = {b: [] for b in bits}
            seconds, per_iter, similarity, refine_seconds, fidelity, kept, candidates = [], [], [], [], {}, {}, {}
            refine_settings = dict(refine or {"method": "brecq"}) if "refine" in variants else {}
            refine_method = refine_settings.pop("method", None)
            for variant, setting, value in (("lsq", "act_lr", LSQ_LR), ("wstep", "weight_step_lr", WSTEP_LR),
                                            ("nowstep", "weight_step_lr", 0.0), ("views4", "views", 4),
                                            ("it500", "iters", 500), ("it2000", "iters", 2000),
                                            ("qdropin", "input_drop", 0.5), ("noqdropin", "input_drop", 0.0),
                                            ("inside", "correct_inside", True), ("after", "correct_inside", False),
                                            ("inwritten", "inside_means", "written"),
                                            ("incalib", "inside_means", "calibration"),
                                            ("pd", "prediction_weight", PD_WEIGHT), ("pdt1", "prediction_temperature", 1.0)):
                if variant in variants:
                    if not refine_method:
                        raise SystemExit(f"row {row!r}: +{variant} sets how reconstruction learns; add +refine")
                    refine_settings[setting] = value
            settings = {k: v for variant in variants for k, v in VARIANTS[variant].items()}
            row_calibrator = settings.pop("calibrator", calibrator)
            if "inversion" in settings.get("fallback_probes", ()):  # the probe's synthesis as the profile's
                settings.update(iters=iters, synth=SynthOptions(**(synth or {})))
            learning = [v for v in variants if v in QAT_DATA]
            if len(learning) > 1 or (learning and refine_method):
                raise SystemExit(f"row {row!r}: one of +refine, +qat, +qatgen, +qatgdfq")
            qat_settings = dict(qat or {}, **QAT_DATA[learning[0]]) if learning else None
            for variant in (v for v in variants if v in QAT_VARIANTS):
                refine_start = QAT_VARIANTS[variant].get("start") in REFINE_STARTS  # a start reconstruction has too
                if qat_settings is None and refine_method and refine_start:
                    refine_settings.update(QAT_VARIANTS[variant])
                    continue
                if qat_settings is None:
                    raise SystemExit(f"row {row!r}: +{variant} sets how QAT trains; add +qat, +qatgen or +qatgdfq"
                                     + (" (or +refine)" if refine_start else ""))
                qat_settings.update(QAT_VARIANTS[variant])
            start_refine = dict(refine or {}) if qat_settings and qat_settings.get("start") == "refine" else None
            synthetic_samples = num_samples if base == "real" else (synth_samples or num_samples)
            if "s256" in variants:
                if base == "real":
                    raise SystemExit(f"row {row!r}: +s256 sizes a synthetic set; the real calibration stays at --num-samples")
                synthetic_samples = LARGE_SET
            held = HELD_OUT if {"held", "heldaside"} & set(variants) else 0
            if "heldaside" in variants and base == "real":
                raise SystemExit(f"row {row!r}: +heldaside checks a synthetic set's calibration images on themselves")
            if "held64" in variants and base != "real":
                raise SystemExit(f"row {row!r}: +held64 holds out real files; synthetic rows hold out with +held")
            if base == "real":  # +held: quantize holds out HELD_OUT of the files not calibrated on (among those scored)
                settings["holdout"], held = (HELD_MANY if "held64" in variants else held), 0
            few = [int(v.removeprefix("few")) for v in variants if v.startswith("few")]
            if few and (base != "real" or len(few) > 1):
                raise SystemExit(f"row {row!r}: one +fewN, on a real row (N of its calibration files)")
            if few:
                synthetic_samples = few[0]
            for seed in (seeds if base != "real" else (0,)):
                if (base, seed, held, synthetic_samples) not in made:
                    if base == "real":
                        made[(base, seed, held, synthetic_samples)] = (
                            (data if not few else
                             handful(loaded, data, recipe, num_samples, synthetic_samples, settings["holdout"])),
                            None, None, None)
                    else:
                        if base == "dsg-kept" and twin is None:
                            raise SystemExit(f"row {row!r} needs the model's BN-kept twin; {model} has none here")
                        source = twin if base == "dsg-kept" else model
                        start = time.perf_counter()
                        # a source's own settings (e.g. dsg-full's low_res 0, dsg-batch-i500's iters) over the
                        # profile's, which drawn images (gaussian, procedural) do not read
                        optimised = {} if SynthMethod.parse(SOURCES[base]["method"], "method").drawn else \
                            {**(synth or {}), "iters": iters}
                        own = {name: (tuple(str(_companion(source, m)) for m in value) if name == "mix_models"
                                      else value) for name, value in SOURCES[base].items()}
                        made_as = SynthConfig(**{**optimised, **own,
                                                 "num_samples": synthetic_samples, "seed": seed, "device": device,
                                                 "preprocess": recipe})
                        cached = _cached_set(cache, source, made_as, held)
                        if cached is not None and cached.exists():
                            synthetic = SyntheticSet.load(cached)
                            took = synthetic.meta["seconds"]
                            print(f"{Path(model).name} {base} seed {seed}: synthetic set from {cached}", file=log)
                        else:
                            synthetic = synthesize(loaded if source == model else source, made_as, holdout=held,
                                                   output=cached)
                            took = time.perf_counter() - start
                        made[(base, seed, held, synthetic_samples)] = (synthetic, took, synthetic.meta["seconds_per_iter"],
                                                    synthetic.meta["diversity"].get("sample_similarity"))
                calib, took, iter_s, similar = made[(base, seed, held, synthetic_samples)]
                if "heldaside" in variants:  # the same calibration images, checked on themselves
                    calib = SyntheticSet(calib.images, calib.meta)
                seconds += [took] if took is not None else []
                per_iter += [iter_s] if iter_s else []
                similarity += [similar] if similar is not None else []
                for b in bits:
                    wbits, abits = widths(b)
                    if any(not ONLY_AT[variant](wbits, abits) for variant in variants if variant in ONLY_AT):
                        continue  # mixed precision acts among simulated widths, the 8-bit first layer below 8
                    out = Path(keep if keep is not None else scratch) / f"{row}-{seed}-w{wbits}a{abits}.onnx"
                    if "cands" in variants:
                        settings["keep_candidates"] = str(out.with_name(f"{out.stem}-candidates"))
                    done = quantize(loaded, QuantConfig(
                        wbits=wbits, abits=abits, calib=calib, num_samples=synthetic_samples, calibrator=row_calibrator,
                        logits=logits,
                        preprocess=recipe, output=str(out), force=True, validate=False, device=device,
                        seed=seed, refine=(RefineConfig(method=refine_method, **refine_settings) if refine_method else
                                           RefineConfig(**start_refine) if start_refine is not None else None),
                        qat=QatConfig(**qat_settings) if qat_settings else None, **settings))
                    if done.refine and "fidelity" in done.refine:
                        # (with +refstart, the reconstruction QAT started from too)
                        refine_seconds.append(done.refine["seconds"]
                                              + done.refine.get("start", {}).get("reconstruction", {}).get("seconds", 0))
                        # the trained simulation against the written file (before bias correction)
                        fidelity[str(b)] = {k: done.refine["fidelity"][k] for k in ("agreement", "sqnr_db")}
                    check = next((d["against_plain"] for d in done.decisions.values()
                                  if isinstance(d, dict) and "against_plain" in d), None)
                    if check is not None:  # quantize's choice between the learned (or SQuant) model and plain rounding
                        kept.setdefault(str(b), []).append({k: check[k] for k in CHECK_KEYS if k in check})
                    if "mixed" in done.decisions:
                        results.setdefault("mixed", {})[f"{row} {bits_label(b)}"] = done.decisions["mixed"]["weight_share_8bit"]
                    if keep is not None:  # scored later, where the labelled images are
                        item = {"row": row, "seed": seed, "bits": b, "model": out.name}
                        if check is not None and "candidates" in check:
                            item.update(check=kept[str(b)][-1], candidates={
                                name: os.path.relpath(path, keep) for name, path in check["candidates"].items()})
                        results["pending"].append(item)
                        print(f"{Path(model).name} {row} seed {seed} {bits_label(b)}: kept unscored as {out}", file=log,
                              flush=True)
                        continue
                    report = validate(model, str(out), ValidateConfig(), images=held_images,
                                      labels=held_labels).to_dict()
                    _note_evaluation(results, report)
                    runs[b].append(_figures(report))
                    if check is not None and "candidates" in check:
                        candidates.setdefault(str(b), []).append(
                            _score_candidates(model, check, held_images, held_labels))
                    print(f"{Path(model).name} {row} seed {seed} {bits_label(b)}: top-1 {report['quantized']['top1']:.2f}% "
                          f"(fp32 {report['fp32']['top1']:.2f}%, {report['num_samples']} images)", file=log, flush=True)
            results["rows"][row] = {
                **_row_figures(runs),
                "synthesis_seconds": round(float(np.mean(seconds)), 1) if seconds else None,
                "seconds_per_iter": round(float(np.mean(per_iter)), 4) if per_iter else None,
                "sample_similarity": round(float(np.mean(similarity)), 5) if similarity else None,
            }
            if qat_settings:
                results["rows"][row].update(qat=qat_settings, refine_seconds=round(float(np.mean(refine_seconds)), 1),
                                            refine_fidelity=fidelity,
                                            **({"start_refine": start_refine} if start_refine is not None else {}))
            if refine_method:
                results["rows"][row].update(refine=dict(refine_settings, method=refine_method),
                                            refine_seconds=round(float(np.mean(refine_seconds)), 1),
                                            refine_fidelity=fidelity)
            if kept:
                results["rows"][row]["against_plain"] = kept
            if candidates:
                results["rows"][row]["candidates"] = candidates
    results["torch"] = torch.__version__
    return results


def _figures(report: dict) -> tuple:
    return (report["quantized"]["top1"], report["quantized"]["top5"], report["agreement"], report["sqnr_db"])


def _note_evaluation(results: dict, report: dict) -> None:
    results["fp32"] = {"top1": report["fp32"]["top1"], "top5": report["fp32"]["top5"]}
    results["eval_images"] = report["num_samples"]
    results["providers"] = report["providers"]["quantized"]


def _row_figures(runs: dict) -> dict:
    """A row's cells from its runs ({bits: [(top1, top5, agreement, sqnr_db), ...]})."""
    import numpy as np

    runs = {b: v for b, v in runs.items() if v}
    return {
        "top1": {str(b): [round(float(np.mean([r[0] for r in v])), 2), round(float(np.std([r[0] for r in v])), 2)]
                 for b, v in runs.items()},
        "top5": {str(b): round(float(np.mean([r[1] for r in v])), 2) for b, v in runs.items()},
        # top-1 agreement with FP32 (%) and logit SQNR (dB): quieter than top-1 on 900 images
        "agreement": {str(b): round(100 * float(np.mean([r[2] for r in v])), 2) for b, v in runs.items()},
        "sqnr_db": {str(b): (round(float(np.mean(finite)), 2) if (finite := [r[3] for r in v if r[3] is not None])
                             else None) for b, v in runs.items()},
        "runs": len(next(iter(runs.values()))) if runs else 0,
    }


def score_pending(results: dict, folder, model, data, recipe, max_eval=None, log=sys.stderr) -> dict:
    """Score the models a ``run_table(..., keep=folder)`` left unscored (``model``: the same file
    as the run's, here) on the held-out images of ``data`` (the split ``run_table`` would have
    used) and fill in their rows' cells. They are scored exactly (``validate --exact``: their
    QDQ graphs as written): quantize chose reduce_range for the CPU they were made on, and on
    an x86 CPU without VNNI ORT's fused kernels would saturate a model made for one with it."""
    from dsgonnx import ValidateConfig, validate
    from dsgonnx.graph.onnx_io import load_model

    folder = Path(folder)
    held_images, held_labels = held_out(load_model(model), data, recipe, results["num_samples"], max_eval)
    runs, candidates = {}, {}
    for item in results.pop("pending"):
        report = validate(model, str(folder / item["model"]), ValidateConfig(exact=True), images=held_images,
                          labels=held_labels).to_dict()
        _note_evaluation(results, report)
        runs.setdefault(item["row"], {}).setdefault(item["bits"], []).append(_figures(report))
        if "candidates" in item:
            check = dict(item["check"], candidates={name: str(folder / path) for name, path in item["candidates"].items()})
            candidates.setdefault(item["row"], {}).setdefault(str(item["bits"]), []).append(
                _score_candidates(model, check, held_images, held_labels, exact=True))
        print(f"{Path(model).name} {item['row']} seed {item['seed']} {bits_label(item['bits'])}: top-1 "
              f"{report['quantized']['top1']:.2f}% (fp32 {report['fp32']['top1']:.2f}%, {report['num_samples']} images)",
              file=log, flush=True)
    for row, cells in runs.items():
        results["rows"][row].update(_row_figures(cells))
    for row, cells in candidates.items():
        results["rows"][row]["candidates"] = cells
    results["arithmetic"] = "exact"
    return results


# what a table keeps of quantize's fallback check (decisions.<refine|qat|rounding>.against_plain)
CHECK_KEYS = ("kept", "on", "learned", "plain", "squant", "uncorrected", "procedural", "inversion", "steps", "left_out")
# the model --fallback wrote instead of the learned one: nearest rounding, SQuant's rounding, the
# refined model without bias correction on its refined layers
FALLBACK_MARKS = {"†": "plain", "‡": "squant", "§": "uncorrected"}
FALLBACK_NAMES = {"plain": "plain (nearest) rounding", "squant": "SQuant's rounding without learning",
                  "uncorrected": "the refined model without bias correction on its refined layers"}


def _score_candidates(model, check: dict, images, labels, exact=False) -> dict:
    """Each model quantize's fallback weighed (``check["candidates"]``, written by
    --keep-candidates) scored on the held-out images, with the logit SQNR the fallback read on
    each of its probes; ``kept``: the one written."""
    from dsgonnx import ValidateConfig, validate

    scored = {"kept": check["kept"], "models": {}, "left_out": sorted(check.get("left_out", {}))}
    probes = {check["on"]: check, **{name: check[name] for name in ("procedural", "inversion") if name in check}}
    for name, path in check["candidates"].items():
        report = validate(model, path, ValidateConfig(exact=exact), images=images, labels=labels).to_dict()
        scored["models"][name] = {"top1": report["quantized"]["top1"], "agreement": round(100 * report["agreement"], 2),
                                  "sqnr_db": report["sqnr_db"],
                                  "probes": {where: probe[name]["sqnr_db"] for where, probe in probes.items()
                                             if name in probe}}
    return scored


# in the fallback's order (each weighed against the one kept before it); "learned" is named by the row
CANDIDATE_NAMES = {"plain": "nearest rounding", "squant": "SQuant's rounding", "learned": None,
                   "uncorrected": "refined, refined layers' biases uncorrected"}


def candidates_markdown(results: dict) -> str:
    """The ``+cands`` rows' candidates: what the fallback read on its probes and what each
    scores on the held-out images (empty where no row has them)."""
    lines = []
    for source, row in results["rows"].items():
        for b, runs in row.get("candidates", {}).items():
            for run in runs:
                if not lines:
                    lines = ["| row | bits | candidate | top-1 | agreement | held-out logit SQNR dB | "
                             "SQNR dB on the fallback's probes |", "|---|---|---|---|---|---|---|"]
                best = max(figures["top1"] for figures in run["models"].values())
                learned = ("refined, bias-corrected" if row.get("refine") else "trained" if row.get("qat")
                           else "SQuant's rounding")
                for name in sorted(run["models"], key=list(CANDIDATE_NAMES).index):
                    figures = run["models"][name]
                    label = ({**CANDIDATE_NAMES, "learned": learned}[name]
                             + (" (written)" if name == run["kept"] else "")
                             + (" (kept on disk, not weighed)" if name in run.get("left_out", ()) else ""))
                    top1 = f"**{figures['top1']:.2f}**" if figures["top1"] == best else f"{figures['top1']:.2f}"
                    probes = ", ".join(f"{where} {db}" for where, db in figures["probes"].items()) or "–"
                    sqnr = "–" if figures["sqnr_db"] is None else f"{figures['sqnr_db']:.2f}"
                    lines.append(f"| {source} | {bits_label(b)} | {label} | {top1} | {figures['agreement']:.2f} | "
                                 f"{sqnr} | {probes} |")
    return "\n".join(lines)


def _companion(model, name: str) -> Path:
    """A ``mix_models`` companion: the file ``name`` beside ``model``, else in the project's models/
    (EfficientNet-Lite0's export)."""
    beside = Path(model).parent / name
    return beside if beside.exists() else Path(__file__).resolve().parent.parent / "models" / name


# SynthConfig fields added after synthetic sets were cached, with the value every such set was made with
_LATER_FIELDS = {"start": "gaussian", "generator": False, "swing": False, "mix_models": ()}
_LATER_BY_METHOD = ("jitter",)  # left out of the key where they are the method's own default


def _cached_set(cache, model, settings, holdout=0):
    """Where a synthetic set for ``model`` made with ``settings`` (and ``holdout`` samples more,
    held out) is kept in ``cache`` (None: no cache)."""
    if cache is None:
        return None
    import hashlib

    from dataclasses import asdict, replace

    resolved = asdict(settings.for_model(has_bn=True)[0])  # weights left unset keyed as the method fills them in
    by_method = asdict(replace(settings, **{name: None for name in _LATER_BY_METHOD}).for_model(has_bn=True)[0])
    for name, default in {**_LATER_FIELDS, **{name: by_method[name] for name in _LATER_BY_METHOD}}.items():
        if resolved.get(name) == default:  # the sets cached before a field existed keep their names
            del resolved[name]
    key = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:12] + json.dumps(resolved, sort_keys=True, default=str)
    key += f"holdout={holdout}" if holdout else ""  # (the sets made before held-out samples keep their names)
    Path(cache).mkdir(parents=True, exist_ok=True)
    return Path(cache) / f"{Path(model).stem}-{settings.method.value}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def markdown(results: dict) -> str:
    bits = results["bits"]
    fp = results["fp32"]["top1"]
    lines = ["| calibration | " + " | ".join(f"{bits_label(b)} top-1 (drop) · agreement" for b in bits)
             + " | synthesis s | s/iter | sample_similarity |",
             "|---|" + "---|" * (len(bits) + 3)]
    for source, row in results["rows"].items():
        cells = []
        for b in bits:
            if str(b) not in row["top1"]:
                cells.append("–")
                continue
            mean, std = row["top1"][str(b)]
            spread = f" ± {std:.2f}" if row["runs"] > 1 else ""
            agreement = row.get("agreement", {}).get(str(b))
            checks = row.get("against_plain", {}).get(str(b), [])
            marks = ""
            for mark, name in FALLBACK_MARKS.items():
                count = sum(c["kept"] == name for c in checks)
                marks += mark * bool(count) + (f"×{count}" if count and row["runs"] > 1 else "")
            cells.append(f"{mean:.2f}{spread}{marks} ({mean - fp:+.2f})"
                         + (f" · {agreement:.2f}" if agreement is not None else ""))
        synthesis = row["synthesis_seconds"]
        if row.get("refine_seconds") is not None:
            synthesis = (f"{synthesis if synthesis is not None else 0} + {row['refine_seconds']} "
                         f"{'qat' if row.get('qat') else 'refine'}")
        extra = [str(synthesis if synthesis is not None else "–"),
                 str(row["seconds_per_iter"] if row["seconds_per_iter"] is not None else "–"),
                 str(row["sample_similarity"] if row["sample_similarity"] is not None else "–")]
        lines.append(f"| {source} | " + " | ".join(cells + extra) + " |")
    every_check = [c for row in results["rows"].values() for checks in row.get("against_plain", {}).values()
                   for c in checks]
    # (checks before commit b89b24f had one probe)
    probes = " and on procedural images" if any("procedural" in c for c in every_check) else ""
    if any("inversion" in c for c in every_check):  # (since commit b19c7c9)
        probes += ("; where the model learned from procedural images, and in rows +invprobe / +bothprobes, "
                   "on 32 inversion images too (rows +invprobe: instead of procedural images)")
    for mark, name in FALLBACK_MARKS.items():
        if any(c["kept"] == name for c in every_check):
            lines.append(f"\n{mark} the learned (or SQuant-rounded) model did not follow the float model as closely as "
                         f"{FALLBACK_NAMES[name]} (logit SQNR on the calibration images{probes}, or in rows `…+held` "
                         f"on the set's {HELD_OUT} held-out synthetic samples: alone since commit e6035b8, with "
                         "procedural images beside them before it and in rows `…+procprobe`): quantize wrote that model "
                         "(`--fallback`, the default; cells whose check has `steps` in results.json were decided by "
                         "commit db97425's rule — at least as close on one probe and not measurably less close on any, "
                         "by a paired bootstrap — the others by the earlier one, at least as close on every probe).")
    if any({"held", "heldaside"} & set(row.split("+")[1:]) for row in results["rows"]):
        lines.append(f"\nRows `…+held`: the synthetic set was made with {HELD_OUT} samples more, held out "
                     f"(`dsgonnx synthesize --holdout {HELD_OUT}`), and quantize checks the models it weighs on them "
                     "(DSG sets: on them alone since commit e6035b8; rows `…+held+procprobe` on procedural images "
                     "too, `--fallback-probes procedural`, as before it); rows `…+heldaside`: the same set's "
                     "calibration images alone, checked on themselves (and on procedural images).")
    if any(parse_row(row)[0] == "real" and {"held", "held64"} & set(parse_row(row)[1]) for row in results["rows"]):
        lines.append(f"\nRows `real…+held`: quantize held out {HELD_OUT} of the files not calibrated on "
                     f"(`--holdout {HELD_OUT}`, the default since commit 919f8c0), which decide alone; they are "
                     f"{HELD_OUT} of the images scored (unlabelled there: only the float model's logits are "
                     f"compared); rows `real…+held64` hold out {HELD_MANY} the same way (`--holdout {HELD_MANY}`); "
                     "the other real rows hold none out (`--holdout 0`, as before it).")
    if any("s256" in row.split("+")[1:] for row in results["rows"]):
        lines.append(f"\nRows `…+s256`: a synthetic set of {LARGE_SET} samples (synthesis seconds for all of them; "
                     f"the real rows' calibration stays at {results['num_samples']} images, and so does the scoring split).")
    if counts := sorted({v for row in results["rows"] for v in parse_row(row)[1] if v.startswith("few")},
                        key=lambda v: int(v[3:])):
        lines.append(f"\nRows `real+{'`, `real+'.join(counts)}`: a handful of photos, that many of the "
                     f"{results['num_samples']} real calibration files spread over them (with `+held`, {HELD_OUT} "
                     "others of them held out); the images scored are every row's.")
    lines.append(f"\nFP32 top-1 {fp:.2f}% on {results['eval_images']} held-out images.")
    if scored := candidates_markdown(results):
        lines += ["", "Rows `…+cands`: every model the fallback weighed (`quantize --keep-candidates`), scored on the "
                  "same held-out images; the best top-1 in bold, the one quantize wrote marked.", "", scored]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="labelled image folder; every k-th image calibrates 'real'")
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--resize", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--bits", default="8,6,4", help="widths: B (weights and activations) or wWaA, e.g. 8,6,4,w4a8")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--slack-reading")
    parser.add_argument("--low-res", type=int, help="synthesis resolution schedule (see dsgonnx synthesize)")
    parser.add_argument("--calibrator", default="auto")
    parser.add_argument("--logits", default="exclude")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-eval", type=int, help="evaluate on at most this many held-out images")
    parser.add_argument("--json")
    parser.add_argument("--calib-cache", metavar="DIR", help="reuse synthetic sets made with the same settings from DIR")
    args = parser.parse_args(argv)

    from dsgonnx.preprocess import preprocess_from_preset

    recipe = preprocess_from_preset(args.preprocess, resize=args.resize, crop=args.crop)
    synth = {k: v for k, v in (("lr", args.lr), ("slack_reading", args.slack_reading), ("low_res", args.low_res))
             if v is not None}
    results = run_table(args.model, args.data, recipe, bits=parse_bits(args.bits),
                        sources=args.sources.split(","), seeds=[int(s) for s in args.seeds.split(",")],
                        num_samples=args.num_samples, iters=args.iters, synth=synth, calibrator=args.calibrator,
                        logits=args.logits, device=args.device, max_eval=args.max_eval, cache=args.calib_cache)
    results.update(machine=platform.platform(), python=sys.version.split()[0], argv=sys.argv)
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
