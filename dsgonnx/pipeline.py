"""``quantize``: model -> calibration data -> QDQ model -> checks -> validation.

The one module that imports every stage. Each stage reports its time on stderr.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx

from . import __version__
from .artifacts import check_output_folder
from .calibration_data import load_real_images
from .errors import DataError, ModelLoadError, UnsupportedModelError
from .graph.onnx_io import LoadedModel, load_model
from .progress import say
from .quant.bits import resolve_bits, tag
from .quant.calibrate import compute_ranges
from .quant.config import QuantConfig
from .quant.qdq import pre_process, quantize_qdq
from .quant.reader import ArrayReader


@dataclass
class QuantResult:
    """What ``quantize`` wrote and found."""

    output: Path
    bits: dict[str, Any]
    calibration: dict[str, Any]
    decisions: dict[str, Any]
    report: Optional[Any] = None  # dsgonnx.validate.ValidationReport
    refine: Optional[dict] = None  # dsgonnx.refine report: layers, loss before/after per unit, time
    refined_weights: dict = field(default_factory=dict)  # weight name -> RefinedWeight (learned integers, scales)
    timings: dict[str, float] = field(default_factory=dict)


CPU_ITERS = 100  # measured: see README "CPU defaults"
CPU_LOW_RES = 128  # CPU resolution schedule for inputs of 160 px and more
GPU_ITERS = 500  # the papers' setting


def _on_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def default_iters(device: str = "auto") -> int:
    """Synthesis iterations: the papers' 500 where CUDA runs synthesis, fewer on CPU."""
    return GPU_ITERS if _on_cuda(device) else CPU_ITERS


def default_low_res(device: str, input_size: int) -> Optional[int]:
    """On CPU, large inputs are first optimised at 128 px (3/4 of the iterations): a
    224-px iteration of EfficientNet-Lite0 costs ~8x a 128-px one on 2 cores."""
    return CPU_LOW_RES if not _on_cuda(device) and input_size >= 160 else None


def default_output(model_path: Path, wbits: int, abits: int) -> Path:
    return model_path.with_name(f"{model_path.stem}.{tag(wbits, abits)}.onnx")


def _check_output(model_path: Path, output: Path, force: bool) -> None:
    if output.resolve() == model_path.resolve():
        raise DataError(f"output {output} is the input model; dsgonnx never overwrites its input")
    if output.suffix != ".onnx":
        raise DataError(f"output must be an .onnx file, got {output.name!r}")
    check_output_folder(output)
    if output.exists() and not force:
        raise DataError(f"{output} exists; pass --force to overwrite it")


class _Stages:
    def __init__(self, quiet: bool):
        self.quiet, self.timings = quiet, {}

    def run(self, name: str, func, *args, **kwargs):
        start = time.perf_counter()
        say(f"[{name}] ...", self.quiet)
        result = func(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 3)
        say(f"[{name}] done in {self.timings[name]:.1f}s", self.quiet)
        return result


def quantize(model: str | os.PathLike | LoadedModel, config: Optional[QuantConfig] = None, **overrides) -> QuantResult:
    """Quantize ``model`` as ``config`` says; mirrors ``dsgonnx quantize``.

    Raises :class:`DsgonnxError` subclasses for bad input (nothing written) and
    :class:`AccuracyGateError` when the validation gate fails (model and report written).
    """
    config = replace(config or QuantConfig(), **overrides) if overrides else (config or QuantConfig())
    stages = _Stages(config.quiet)
    loaded = model if isinstance(model, LoadedModel) else stages.run("load", load_model, model, config.input_shape)
    if loaded.input.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(
            f"quantize needs a float32 model; input '{loaded.input.name}' is {loaded.input.dtype} "
            "(convert the model to float32 first)"
        )
    weights, activations = resolve_bits(config.wbits, config.abits, config.target)
    output = Path(config.output) if config.output else default_output(loaded.path, config.wbits, config.abits)
    _check_output(loaded.path, output, config.force)
    reduce_range = config.reduce_range
    if reduce_range is None:
        from .hardware import needs_reduce_range

        reduce_range = config.target == "cpu" and weights.bits == 8 and needs_reduce_range()
    say(f"quantize: W{config.wbits}A{config.abits} for {config.target} "
        f"(weights {weights.quant_type.name}{' simulated' if weights.simulated else ''}, activations "
        f"{activations.quant_type.name}{' simulated' if activations.simulated else ''}"
        f"{', reduce_range: this CPU has no VNNI' if reduce_range else ''})", config.quiet)

    calib_images, holdout, calib_info, calib_files = stages.run("calibration data", _calibration_data, loaded, config)
    batch = loaded.input.shape[0] or _even_batch(len(calib_images))
    with tempfile.TemporaryDirectory(prefix="dsgonnx-quant-") as scratch:
        prepared = stages.run("pre-process", pre_process, loaded.path, Path(scratch) / "prepared.onnx")
        ranges = stages.run("calibrate", compute_ranges, prepared, ArrayReader(loaded.input.name, calib_images, batch),
                            config.calibrator, activations)
        refined = None
        if config.refine:
            refined = stages.run("refine", _refine, prepared, Path(scratch) / "refined.onnx", ranges, weights,
                                 activations, calib_images, holdout, reduce_range, config)
        fd, tmp_name = tempfile.mkstemp(dir=output.parent if str(output.parent) else ".", prefix=f".{output.name}.",
                                        suffix=".tmp.onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            decisions = stages.run("quantize", quantize_qdq, refined.path if refined else prepared, tmp, ranges,
                                   weights, activations, per_channel=config.per_channel, reduce_range=reduce_range,
                                   exclude=config.exclude, logits=config.logits,
                                   refined=refined.weights if refined else None)
            if refined:
                decisions["refine"] = {"method": config.refine, "layers": len(refined.weights)}
            bits = {"weights": weights.bits, "activations": activations.bits,
                    "weight_type": weights.quant_type.name, "activation_type": activations.quant_type.name,
                    "simulated": weights.simulated or activations.simulated, "target": config.target,
                    "per_channel": config.per_channel, "reduce_range": reduce_range,
                    "calibrator": config.calibrator}
            stages.run("check", _finish_model, tmp, loaded, bits, calib_info, decisions, calib_images[:1])
            os.replace(tmp, output)
        finally:
            if tmp.exists():
                tmp.unlink()
    say(f"quantize: wrote {output}", config.quiet)
    result = QuantResult(output=output, bits=bits, calibration=calib_info, decisions=decisions, timings=stages.timings,
                         refine=refined.report if refined else None, refined_weights=refined.weights if refined else {})
    if config.validate:
        result.report = stages.run("validate", _validate, loaded, output, config, holdout, calib_files, bits, calib_info,
                                   result.refine)
    return result


def _even_batch(count: int, limit: int = 16) -> int:
    """The largest batch size <= limit that divides ``count``: ORT's histogram collectors
    (percentile, entropy) fail on batches of unequal size."""
    return max(b for b in range(1, min(limit, count) + 1) if count % b == 0)


def _calibration_data(loaded: LoadedModel, config: QuantConfig):
    """(calibration images, held-out images or None, description, calibration files)."""
    start = time.perf_counter()
    if config.synthetic:
        from .synth import SynthConfig, synthesize

        holdout = config.holdout if config.validate and config.val_data is None else 0
        settings = dict(config.synth)
        if config.iters_by_device:
            settings.setdefault("low_res", default_low_res(config.device, min(loaded.input.chw[1:])))
        synth_config = SynthConfig(method=config.calib, num_samples=config.num_samples + holdout, iters=config.iters,
                                   seed=config.seed, device=config.device, preprocess=config.preprocess,
                                   quiet=config.quiet, **settings)
        synthetic = synthesize(loaded, synth_config)
        images = synthetic.images
        info = {"method": config.calib, "num_samples": config.num_samples, "iters": config.iters,
                "seconds": round(time.perf_counter() - start, 3), "device": synthetic.meta["device"],
                "diversity": synthetic.meta["diversity"], "holdout": holdout,
                "synth": {k: v for k, v in synthetic.meta["config"].items() if k not in ("extra",)}}
        return images[: config.num_samples], (images[config.num_samples :] if holdout else None), info, ()
    real = load_real_images(config.calib, loaded.input, config.num_samples, config.preprocess)
    info = {"method": real.method, "source": real.source, "num_samples": len(real.images), "iters": 0,
            "seconds": round(time.perf_counter() - start, 3)}
    return real.images, None, info, real.files


def _finish_model(path: Path, loaded: LoadedModel, bits: dict, calibration: dict, decisions: dict, sample: np.ndarray):
    """Stamp metadata, run the ONNX checker and one ONNX Runtime inference."""
    import json

    import onnxruntime as ort

    model = onnx.load(str(path))
    meta = {"dsgonnx.version": __version__, "dsgonnx.source_sha256": loaded.sha256,
            "dsgonnx.bits": json.dumps(bits), "dsgonnx.simulated": str(bits["simulated"]).lower(),
            "dsgonnx.calibration": json.dumps({k: calibration[k] for k in ("method", "num_samples", "iters")}),
            "dsgonnx.decisions": json.dumps(decisions)}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"the quantized model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {loaded.input.name: sample.astype(np.float32)})
    if not all(np.isfinite(o).all() for o in outputs):
        raise UnsupportedModelError("the quantized model produces NaN/Inf on a calibration image")


def _refine(prepared: Path, out: Path, ranges, weights, activations, images, holdout, reduce_range, config: QuantConfig):
    """Learn the weight rounding on the calibration images (dsgonnx.refine; imports torch)."""
    from .quant.qdq import activation_grids, excluded_nodes, weight_top
    from .refine import RefineConfig, refine_model

    exclude, _ = excluded_nodes(onnx.load(str(prepared)), config.exclude, config.logits)
    options = RefineConfig(method=config.refine, device=config.device, seed=config.seed, quiet=config.quiet,
                           **config.refine_options)
    return refine_model(prepared, out, activation_grids(ranges, activations), images, holdout, exclude=set(exclude),
                        per_channel=config.per_channel, weight_top=weight_top(weights, reduce_range), config=options)


def _validate(loaded: LoadedModel, output: Path, config: QuantConfig, holdout, calib_files, bits, calibration,
              refine=None):
    from .validate import ValidateConfig, check_gate, validate

    extra = {"bits": bits, "simulated": bits["simulated"], "calibration": calibration}
    if refine:
        extra["refine"] = refine
    vconfig = ValidateConfig(data=config.val_data, preprocess=config.preprocess, provider=config.provider,
                             max_drop=config.max_drop, min_agreement=config.min_agreement, report_path=config.report,
                             extra=extra, exclude_files=frozenset(calib_files))
    if config.val_data is None:
        if holdout is None or not len(holdout):
            say("validate: no --val-data and no held-out samples; skipped", config.quiet)
            return None
        report = validate(loaded.path, output, vconfig, images=holdout)
    else:
        report = validate(loaded.path, output, vconfig)
    if not config.quiet:
        import sys

        sys.stderr.write(report.table() + "\n")
    check_gate(report, config.max_drop, config.min_agreement)
    return report
