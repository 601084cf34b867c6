"""``quantize``: model -> calibration data -> QDQ model -> checks -> validation.

The one module that imports every stage. Each stage logs its time (logger ``dsgonnx``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
from onnx import helper

from . import __version__, distributed
from .artifacts import cannot_create_in, check_output_folder, publish, same_file
from .calibration_data import held_out_name, holds_out, load_real_images
from .config import (DEFAULT_EPSILON, DEFAULT_SLACK_READING, BiasCorrection, Calibrator, PoolRange, QuantConfig,
                     RefineConfig, Rounding, SynthMethod, SynthOptions, SynthStart, ValidateConfig)
from .errors import DataError, DsgonnxError, ModelLoadError, UnsupportedModelError
from .graph.layout import channels_last_input
from .graph.normalize import file_interface
from .graph.onnx_io import LoadedModel, fixed_batch_interface, load_model, quantizable, unit_pixel_twin
from .preprocess import PRESETS
from .progress import say
from .quant.bits import resolve_bits, tag
from .quant.calibrate import compute_ranges, share_pool_ranges
from .quant.qdq import depthwise_layers, first_layer_tensors, pre_process, quantize_qdq, weight_share
from .quant.reader import ArrayReader
from .runtime import ort_session


@dataclass
class QuantResult:
    """What ``quantize`` wrote and found."""

    output: Optional[Path]  # None on the ranks other than 0 of a torchrun launch (rank 0 writes)
    bits: dict[str, Any]
    calibration: dict[str, Any]
    decisions: dict[str, Any]
    report: Optional[Any] = None  # dsgonnx.validation.ValidationReport
    refine: Optional[dict] = None  # dsgonnx.refine report (reconstruction or QAT): layers, losses, time
    refined_weights: dict = field(default_factory=dict)  # weight name -> RefinedWeight (learned integers, scales)
    timings: dict[str, float] = field(default_factory=dict)
    holdout: Optional[np.ndarray] = None  # held-out samples or images (never calibrated on)
    calibration_files: tuple[str, ...] = ()  # image files calibrated on (left out of validation)
    holdout_files: tuple[str, ...] = ()  # image files held out to check on (left out of validation too)

    def summary(self) -> dict:
        """The JSON summary ``dsgonnx quantize`` prints."""
        data = {"output": str(self.output), "bits": self.bits, "calibration": self.calibration,
                "decisions": self.decisions, "timings": self.timings}
        if self.refine is not None:
            data[_learning_key(self.refine)] = self.refine
        if self.report is not None:
            report = self.report.to_dict()
            data["validation"] = {key: report.get(key) for key in ("fp32", "quantized", "drop_top1", "agreement", "sqnr_db")}
        return data


def default_output(model_path: Path, wbits: int, abits: int) -> Path:
    return model_path.with_name(f"{model_path.stem}.{tag(wbits, abits)}.onnx")


def _check_output(model_path: Path, output: Path, force: bool) -> None:
    if output.resolve() == model_path.resolve():
        raise DataError(f"`output` {output} is the input model; dsgonnx never overwrites its input")
    if output.suffix != ".onnx":
        raise DataError(f"`output` must be an .onnx file, got {output.name!r}")
    check_output_folder(output)
    if output.exists() and not force:
        raise DataError(f"{output} exists; set `force` to overwrite it")


class _Stages:
    """Times each stage: ``with stages("calibrate"): ...``."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        say(f"[{name}] ...")
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        say(f"[{name}] done in {self.timings[name]:.1f}s")


def quantize(model: str | os.PathLike | LoadedModel, config: Optional[QuantConfig] = None, **overrides) -> QuantResult:
    """Quantize ``model`` as ``config`` says; mirrors ``dsgonnx quantize``.

    Raises :class:`DsgonnxError` subclasses for bad input (nothing written) and
    :class:`AccuracyGateError` when the validation gate fails (model and report written).
    """
    config = replace(config or QuantConfig(), **overrides) if overrides else (config or QuantConfig())
    stages = _Stages()
    distributed.join_device(config.device)  # torchrun: the ranks share the synthesis (and QAT); rank 0 writes
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        with stages("load"):
            loaded = distributed.together(lambda: load_model(model, config.input_shape))
    if loaded.input.dtype not in (np.float32, np.float16):
        raise UnsupportedModelError(
            f"quantize takes float32 and float16 models; input '{loaded.input.name}' is {loaded.input.dtype} "
            "(convert the model to float32 first)"
        )
    if loaded.takes_pixels:
        # pixels the model normalises itself: 0-255 as they are (a recipe that changes them is refused)
        config = replace(config, preprocess=loaded.preprocess_for(config.preprocess))
        say(f"quantize: input '{loaded.input.name}' takes {loaded.file_dtype.name} pixels: worked on as float32 ones "
            "(the written model keeps the uint8 input, cast to float32 in front)")
    given = loaded
    trains = config.refine is not None or config.qat is not None  # reconstruction or QAT
    loaded = quantizable(loaded, any_batch_twin=trains)
    if loaded is not given:
        say(f"quantize: {loaded.source.name} is worked on as "
            + " and ".join(([] if given.input.dtype != np.float16 else ["float32 (the written model keeps its float16 input "
                                                                  "and outputs, cast at the edges)"])
                           + ([] if given.opset >= loaded.opset else [f"opset {loaded.opset} (converted from "
                                                                      f"{given.opset}: quantization needs it)"])
                           + ([] if given.opset < loaded.opset or loaded.file_batch is None else
                              [f"a twin that takes any batch (the file fixes it at {loaded.file_batch}; the written "
                               "model does again)"])))
    if trains and loaded.input.fixed_batch is not None:
        raise UnsupportedModelError(
            f"{given.source.name} fixes its batch at {loaded.input.fixed_batch} inside (with another batch ONNX "
            "Runtime fails or computes otherwise, e.g. a class token expanded to the traced batch), and `refine` and "
            "`qat` run batches of their own size: export the model with a dynamic batch axis "
            "(torch.onnx.export(..., dynamic_axes={'input': {0: 'N'}}))")
    weights, activations = resolve_bits(config.wbits, config.abits, config.target)
    if config.mixed and not (weights.simulated or activations.simulated):
        raise DataError("mixed precision keeps tensors at 8 bits among simulated ones (2, 3, 5, 6 or 7 bits), "
                        f"not at W{weights.bits}A{activations.bits}")
    output = (Path(config.output) if config.output is not None
              else default_output(loaded.source, config.wbits, config.abits))
    _check_output(loaded.source, output, config.force)
    if config.keep_candidates is not None:
        _check_candidates(Path(config.keep_candidates), loaded.source, output, candidate_files(config), config.force)
    if config.qat is not None and config.qat.checkpoint is not None:
        _check_checkpoint(Path(config.qat.checkpoint), loaded.source, output, config.qat.resume)
    if config.validate:  # the validation's inputs and report, before any work or output
        from .validation.report import check_report_path

        check_report_path(config.report, {"the input model": loaded.source, "the output": output,
                                          "`val_data`": config.val_data,
                                          "`calib`": config.calib if isinstance(config.calib, Path) else None,
                                          "`class_list`": config.class_list,
                                          "`qat.checkpoint`": config.qat and config.qat.checkpoint})
        if config.val_data is not None:  # what the validation would refuse in it, before the minutes
            from .validation.core import check_data

            if not os.path.exists(config.val_data):
                raise DataError(f"`val_data`: data not found: {config.val_data}")
            check_data(loaded.original, _validate_config(config))
        wanted = "min_agreement" if config.min_agreement is not None else "report" if config.report else None
        if config.val_data is None and wanted and (
                config.holdout == 0 or not (config.synthetic or holds_out(config.calib, config.num_samples,
                                                                          config.holdout, loaded.takes_pixels))):
            # (without either, quantize says that validation is skipped and goes on)
            raise DataError(f"`{wanted}` has nothing to score on: no `val_data`, and {_NOTHING_HELD}")
    chw = loaded.input.chw
    if config.refine is not None and config.refine.views > 1 and None not in chw:  # before any image is made
        from .hardware import check_image_memory

        check_image_memory(config.num_samples * config.refine.views, chw, "num_samples × refine.views")
    # what reconstructs (QAT's `start` refine too: with refine's settings, else brecq's defaults)
    reconstruction = config.refine or (RefineConfig() if config.qat is not None and config.qat.start == "refine"
                                       else None)
    if reconstruction is not None and config.synthetic and None not in chw:
        # reconstruction's own check, before the synthesis's minutes (a directory of images may hold
        # fewer than asked for: those are checked, once read, by reconstruction)
        from .refine import check_memory_before

        check_memory_before(loaded, config.num_samples * reconstruction.views + config.holdout, config.holdout > 0,
                            reconstruction, config.device)
    if config.qat is not None and None not in chw:  # QAT's batch too, before the synthesis's minutes
        from .refine.qat import check_qat_memory

        check_qat_memory(loaded, *config.qat.batches(config.num_samples), config.device)
    below = min(weights.bits, activations.bits) < 8  # where the first layer (and --mixed's tensors) stay at 8 bits
    reduce_range = config.reduce_range
    if reduce_range is None:
        from .hardware import needs_reduce_range

        # every 8-bit weight: the model's at W8, the first layer's (and --mixed's) where a side is below 8 bits
        eight_bit = weights.bits == 8 or (below and (config.first_layer_8bit or config.mixed))
        reduce_range = config.target == "cpu" and eight_bit and needs_reduce_range()
    say(f"quantize: W{config.wbits}A{config.abits} for {config.target} "
        f"(weights {weights.quant_type.name}{' simulated' if weights.simulated else ''}, activations "
        f"{activations.quant_type.name}{' simulated' if activations.simulated else ''}"
        f"{', reduce_range: this CPU has no VNNI' if reduce_range else ''})")

    if config.synthetic and min(weights.bits, activations.bits) <= 4 and depthwise_layers(loaded.model, config.exclude):
        # before the synthesis's minutes: the one lever measured to close this gap is not data-free
        say(f"quantize: {PHOTOS_HINT}")
    learning = "qat" if config.qat is not None else "refine" if config.refine is not None else "rounding"
    checked = config.fallback and (learning != "rounding" or config.weight_rounding() != Rounding.NEAREST)
    if config.synthetic and config.calib != SynthMethod.AUTO and not config.calib.drawn:
        # before the synthesis's minutes (drawn images take none; their inversion probe depends on
        # the held-out samples, so they are checked with them, below)
        before = {"method": config.calib.value}
        _check_synthesis_used(config, before, _wanted_probes(config, before, None, learning) if checked else ())
    with stages("calibration data"):
        calib_images, holdout, calib_info, calib_files = _calibration_data(loaded, config)
        outside = _box_check(loaded, config, calib_images, calib_info)
        if outside is not None:
            calib_info = {**calib_info, "outside_pixel_box": outside}
        preprocessing = _preprocessing_check(loaded, calib_images, calib_info)
        if preprocessing is not None:
            calib_info = {**calib_info, "first_bn": preprocessing}
    _check_synthesis_used(config, calib_info, _wanted_probes(config, calib_info, holdout, learning) if checked else ())
    if not distributed.is_writer() and config.qat is None and config.refine is None:
        say(f"quantize: rank {distributed.world().rank} made its share of the calibration images; "
            "rank 0 quantizes and writes the model")
        return QuantResult(output=None, bits={}, calibration=calib_info, decisions={}, timings=stages.timings)
    # with --qat or --refine every rank goes on: the same calibration and grids, then a share of each training batch
    fixed = loaded.input.fixed_batch
    if fixed and len(calib_images) % fixed:  # every run of the model takes whole batches
        filled = -(-len(calib_images) // fixed) * fixed
        say(f"calibration: the model's batch is fixed to {fixed}; {len(calib_images)} images repeated to {filled}")
        calib_images = np.resize(calib_images, (filled, *calib_images.shape[1:]))
        calib_info = {**calib_info, "repeated_to": filled}
    batch = fixed or _even_batch(len(calib_images))
    bits = {"weights": weights.bits, "activations": activations.bits,
            "weight_type": weights.quant_type.name, "activation_type": activations.quant_type.name,
            "simulated": weights.simulated or activations.simulated, "target": config.target.value,
            "per_channel": config.per_channel, "reduce_range": reduce_range,
            "calibrator": config.activation_calibrator().value}
    if config.calibrator == Calibrator.AUTO:
        bits["calibrator_chosen_by"] = f"auto: {activations.bits}-bit activations"
    with tempfile.TemporaryDirectory(prefix="dsgonnx-quant-") as scratch:
        with stages("pre-process"):
            prepared = pre_process(loaded.path, Path(scratch) / "prepared.onnx")
        equalized = None
        if config.cle:
            with stages("equalize"):
                prepared, equalized = _equalize(prepared, Path(scratch) / "equalized.onnx")
        prepared_model = onnx.load(str(prepared))
        first = set()
        if config.first_layer_8bit and below:
            first = first_layer_tensors(prepared_model)
        with stages("calibrate"):
            # the tensors kept at 8 bits get ranges for the 8-bit grid (the MSE search depends on it)
            eight = resolve_bits(8, 8, config.target)[1]
            ranges = compute_ranges(prepared, ArrayReader(loaded.input.name, calib_images, batch),
                                    config.activation_calibrator(), activations, {name: eight for name in first})
        policy = {"pool_range": {"policy": config.pool_range.value, "tensors": []}}
        if config.pool_range == PoolRange.INPUT:
            ranges, policy["pool_range"]["tensors"] = share_pool_ranges(prepared_model, ranges)
        if first:
            policy["first_layer_8bit"] = {"tensors": sorted(first),
                                          "weight_share": round(weight_share(prepared_model, first), 5)}
        refined = None
        probes = {}
        if checked:
            # made before training (every rank of a torchrun launch takes part in a synthesis)
            with stages("fallback probes"):
                probes = _independent_probes(loaded, config, calib_info, holdout, learning)
        correct = None
        if config.bias_correction != BiasCorrection.OFF and config.qat is None:
            # Refined roundings against the weights before refinement: the refined model's float
            # weights are its own quantized values, so measured against them every refined
            # layer's shift is 0. (QAT trains the biases with the weights, end to end: its
            # corrector, made after training, leaves its layers as trained.)
            correct = _BiasCorrector(prepared, None if config.cle else loaded.model, loaded, calib_images, batch,
                                     config.bias_correction)
        correct_learned = correct  # the learned model's correction (_refine: the one its reconstruction simulated)
        if trains:
            with stages(learning):
                # (under torchrun a rank that fails in training exits: torchrun then stops the others)
                refined, correct_learned = _refine(prepared, Path(scratch) / "refined.onnx", ranges, weights,
                                                   activations, calib_images, holdout, reduce_range, config, first,
                                                   loaded, calib_info, correct)
            if not distributed.is_writer():
                say(f"quantize: rank {distributed.world().rank} trained on its share of each batch; "
                    "rank 0 writes the model")
                return QuantResult(output=None, bits=bits, calibration=calib_info, decisions={},
                                   timings=stages.timings)
        elif config.weight_rounding() != Rounding.NEAREST:
            with stages(learning):
                refined = _round(prepared, Path(scratch) / "rounded.onnx", weights, reduce_range, config, first)
        float_path = refined.path if refined else prepared
        if config.bias_correction != BiasCorrection.OFF and config.qat is not None:
            # QAT's layers are left as trained (measured against the trained model, their shift is 0)
            correct = correct_learned = _BiasCorrector(float_path, None if config.cle else loaded.model, loaded,
                                                       calib_images, batch, config.bias_correction)
        keep_8bit, mixed = set(), None
        if config.mixed:
            with stages("mixed precision"):
                keep_8bit, mixed = _choose_mixed(Path(scratch), float_path, ranges, weights, activations, reduce_range,
                                                 refined, correct_learned, calib_images, holdout, batch, loaded, config, first)

        def write(path: Path, source: Path, learned, corrector, label: str = learning) -> dict:
            """The QDQ model of ``source`` (with ``learned``'s integers and steps), bias-corrected."""
            written = quantize_qdq(source, path, ranges, weights, activations,
                                   per_channel=config.per_channel, reduce_range=reduce_range,
                                   exclude=config.exclude, logits=config.logits,
                                   refined=_refined_kept(learned, keep_8bit - first),
                                   learned_activations=_learned_kept(learned, keep_8bit - first),
                                   keep_8bit=keep_8bit | first)
            written.update(policy)
            if mixed is not None:
                written["mixed"] = mixed
            if equalized is not None:
                written["cle"] = equalized
            # the trained simulation is of the file before bias correction, or after it where the
            # correction was simulated while learning (refine.correct_inside)
            inside = learned is not None and bool(learned.report.get("corrected_inside"))
            if corrector is not None and inside:
                with stages("bias correction"):
                    written["bias_correction"] = corrector(path)
            if learned is not None:
                written[label] = {"method": learned.report["method"], "layers": len(learned.weights)}
                if learned.simulation is not None:  # learned in a simulation of this file: how closely it follows it
                    with stages(f"{label} check"):
                        written[label]["fidelity"] = _fidelity(learned, path, calib_images, loaded, label)
            if corrector is not None and not inside:
                with stages("bias correction"):
                    written["bias_correction"] = corrector(path)
            return written

        fd, tmp_name = tempfile.mkstemp(dir=output.parent if str(output.parent) else ".", prefix=f".{output.name}.",
                                        suffix=".tmp.onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with stages("quantize"):
                decisions = write(tmp, float_path, refined, correct_learned)
            if refined and config.fallback:
                with stages(f"{learning} against plain"):
                    corrector = correct if correct is None or config.qat is None else _BiasCorrector(
                        prepared, None if config.cle else loaded.model, loaded, calib_images, batch,
                        config.bias_correction)
                    # what quantize writes without --refine/--qat: nearest rounding, and at 4 bits
                    # or fewer SQuant's rounding too (itself checked against nearest rounding)
                    plain = {}
                    if learning != "rounding" and config.plain_rounding() == Rounding.SQUANT:
                        squant = _round(prepared, Path(scratch) / "rounded.onnx", weights, reduce_range, config, first)
                        plain["squant"] = (Path(scratch) / "squant.onnx", squant)
                    plain["plain"] = (Path(scratch) / "plain.onnx", None)
                    plain_decisions = {name: write(path, rounded.path if rounded else prepared, rounded, corrector,
                                                   "rounding")
                                       for name, (path, rounded) in plain.items()}
                    variants, left_out, unweighed = {}, {}, {}
                    if learning == "refine" and correct is not None:
                        # with synthetic calibration images on a network with depthwise convolutions the
                        # uncorrected model was below the corrected one in every cell measured on the CPU
                        # (EfficientNet-Lite0, MobileNet v1 0.25) and yet the probes, synthetic too, preferred it
                        depthwise = (depthwise_layers(prepared_model, config.exclude)
                                     if calib_info.get("method") != "real" else [])
                        # the refined model with its refined layers' biases as they were (bias
                        # correction measured against the refined weights: a shift of 0 there),
                        # which on ResNets follows the float model more closely
                        uncorrected = Path(scratch) / "uncorrected.onnx"
                        if depthwise:
                            left_out[UNCORRECTED] = (f"synthetic calibration images and {len(depthwise)} depthwise "
                                                     "convolutions: the refined layers' biases stay corrected "
                                                     "(README, 'Every candidate on disk')")
                            say(f"refine: {VARIANT_NAMES[UNCORRECTED]} is not a candidate: {left_out[UNCORRECTED]}"
                                + ("; it is kept with the candidates, not weighed" if config.keep_candidates else ""))
                        if not depthwise or config.keep_candidates is not None:
                            (unweighed if depthwise else variants)[UNCORRECTED] = (uncorrected, write(
                                uncorrected, float_path, refined, _BiasCorrector(
                                    float_path, None if config.cle else loaded.model, loaded, calib_images, batch,
                                    config.bias_correction)))
                    check = _against_plain(tmp, {name: path for name, (path, _) in plain.items()}, prepared, holdout,
                                           calib_images, loaded, learning, probes,
                                           {name: path for name, (path, _) in variants.items()}, _held_name(calib_info),
                                           calib_info.get("method") == SynthMethod.GAUSSIAN.value)
                    if left_out:
                        check["left_out"] = left_out
                    decisions[learning]["against_plain"] = check
                    if config.keep_candidates is not None:
                        weighed = {"learned": (tmp, decisions),
                                   **{name: (path, plain_decisions[name]) for name, (path, _) in plain.items()},
                                   **{name: (path, {**written, learning: decisions[learning]})
                                      for name, (path, written) in {**variants, **unweighed}.items()}}
                        with stages("keep candidates"):
                            check["candidates"] = _keep_candidates(
                                Path(config.keep_candidates), weighed, candidate_files(config), loaded, bits,
                                calib_info, calib_images[: fixed or 1], config.force)
                    if check["kept"] in variants:
                        path, written = variants[check["kept"]]
                        os.replace(path, tmp)
                        decisions = {**written, learning: decisions[learning]}
                        refined.report["kept"] = VARIANT_NAMES[check["kept"]]
                    elif check["kept"] != "learned":
                        path, rounded = plain[check["kept"]]
                        os.replace(path, tmp)
                        decisions = {**plain_decisions[check["kept"]], learning: decisions[learning]}
                        refined.report["kept"] = PLAIN_NAMES[check["kept"]]
                        # the written model holds none of the learned integers or steps
                        refined.weights, refined.activations = (rounded.weights if rounded else {}), {}
            with stages("check"):
                _finish_model(tmp, loaded, bits, calib_info, decisions, calib_images[: fixed or 1])
            report = None
            if config.validate:  # the finished file, before it is published: validation data it cannot
                with stages("validate"):  # be scored on is refused with nothing written or replaced
                    report = _validate(loaded, tmp, output, config, holdout,
                                       (*calib_files, *calib_info.get("holdout_files", ())), bits, calib_info,
                                       refined.report if refined else None)
            publish(tmp, output, replace=config.force)
        finally:
            if tmp.exists():
                tmp.unlink()
    say(f"quantize: wrote {output}")
    result = QuantResult(output=output, bits=bits, calibration=calib_info, decisions=decisions, timings=stages.timings,
                         refine=refined.report if refined else None, refined_weights=refined.weights if refined else {},
                         holdout=holdout, calibration_files=tuple(calib_files),
                         holdout_files=tuple(calib_info.get("holdout_files", ())), report=report)
    if report is not None:
        from .validation import check_gate
        from .validation.report import write_report

        if config.report:
            write_report(report, config.report)
        say(report.table())
        check_gate(report, config.max_drop, config.min_agreement)
    return result


def candidate_files(config: QuantConfig) -> dict[str, str]:
    """The file each model the fallback weighs is kept in under ``config.keep_candidates``:
    "plain" (nearest rounding), "squant" (SQuant's rounding, where quantize without
    refine/qat writes it), "learned" (the refined, trained or SQuant-rounded model) and the
    refined model's ``uncorrected`` variant; all but the last bias-corrected as ``config`` says."""
    learning = "qat" if config.qat is not None else "refine" if config.refine is not None else "rounding"
    files = {"plain": "plain.onnx"}
    if learning != "rounding" and config.plain_rounding() == Rounding.SQUANT:
        files["squant"] = "squant.onnx"
    files["learned"] = {"refine": "refined.onnx", "qat": "trained.onnx",
                        "rounding": f"{config.weight_rounding().value}.onnx"}[learning]
    if learning == "refine" and config.bias_correction != BiasCorrection.OFF:
        files[UNCORRECTED] = "refined-uncorrected.onnx"
    return files


def _check_checkpoint(path: Path, model_path: Path, output: Path, resume: bool = False) -> None:
    """Refuse, before any work, a ``qat.checkpoint`` file QAT could not write (it writes it
    first after ``qat.checkpoint_every`` steps of training), or, to ``resume`` from, a file that
    is no checkpoint (``torch.save`` writes a zip archive), which it would also write over."""
    if path.is_dir():
        raise DataError(f"`qat.checkpoint` {path} is a folder; give a file name")
    clash = same_file(path, {"the input model": model_path, "the output": output})
    if clash is not None:
        raise DataError(f"`qat.checkpoint` {path} is {clash}; give another file")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"`qat.checkpoint` {path} is not a checkpoint dsgonnx wrote (not torch.save's zip archive), "
                        f"{'to resume from' if resume else 'and QAT would write over it'}; give another file")
    try:
        check_output_folder(path)
    except DataError as exc:
        raise DataError(f"`qat.checkpoint`: {exc}") from None


def _check_candidates(folder: Path, model_path: Path, output: Path, files: dict[str, str], force: bool) -> None:
    """Refuse, before any work, a ``keep_candidates`` folder the candidates cannot go to."""
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())  # made if missing
    if not existing.is_dir():
        raise DataError(f"`keep_candidates` {folder}: {existing} is a file, not a folder")
    why = cannot_create_in(existing)
    if why is not None:
        raise DataError(f"`keep_candidates` folder is not writable: {existing} ({why})")
    for file in files.values():
        path = folder / file
        clash = same_file(path, {"the input model": model_path, "the output": output})
        if clash is not None:
            raise DataError(f"`keep_candidates` would write {path}, which is {clash}; choose another folder")
        if path.exists() and not force:
            raise DataError(f"{path} exists; set `force` to overwrite it (or choose another `keep_candidates` folder)")


def _keep_candidates(folder: Path, weighed: dict[str, tuple[Path, dict]], files: dict[str, str], loaded: LoadedModel,
                     bits: dict, calib_info: dict, sample: np.ndarray, force: bool) -> dict[str, str]:
    """Copy each model the fallback weighed (name -> (its file, its decisions)) into ``folder``
    as ``files`` names it, finished as the output is (layout, metadata, checker), each through a
    temporary file renamed into place. Returns name -> path written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, (path, decisions) in weighed.items():
        target = folder / files[name]
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp.onnx")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            shutil.copyfile(path, tmp)
            _finish_model(tmp, loaded, bits, calib_info, json.loads(json.dumps(decisions, default=str)), sample)
            publish(tmp, target, replace=force)
        finally:
            if tmp.exists():
                tmp.unlink()
        written[name] = str(target)
    say(f"quantize: the {len(written)} models the fallback weighed (or left out) are in {folder}: "
        + ", ".join(f"{Path(path).name}" for path in written.values()))
    return written


def _even_batch(count: int, limit: int = 16) -> int:
    """The largest batch size <= limit that divides ``count``: ORT's histogram collectors
    (percentile, entropy) fail on batches of unequal size."""
    return max(b for b in range(1, min(limit, count) + 1) if count % b == 0)


_BATCH_FOR_TRAINING = ("reconstruction or QAT trains on these images (measured, README 'What the DSG images lack for "
                       "QAT' and 'Which alignment reconstruction learns from'); --alignment sample for the papers'")

_LEAVES_FOR_RECONSTRUCTION = ("reconstruction learns from these images and the model has depthwise convolutions (measured, "
                              "README 'Where reconstruction's synthetic images start'); `synth.start` gaussian for the "
                              "papers'")


_NOTHING_HELD = ("nothing is held out of calibration (`holdout` 0, or calibration images without `holdout` more "
                 "than `num_samples`)")


# the calibration images' gap at the model's first BN layer (graph.bn_taps.first_bn_gap, summed
# squared gaps in running-std units) beyond which quantize says that they look unlike the training
# images. Measured 2026-12-06 on 32 real images of each benchmark model with BN: preprocessed as in
# training 0.05-0.41; ImageNet's mean/std for a [-1, 1] model or the reverse 0.39-0.90 (a mix-up
# this cannot tell from right); pixels left at 0-255, 7,166-31,373; Caffe's BGR mean subtracted,
# 2,479-10,481 (ResNet-20, MobileNet v1 0.25, EfficientNet-Lite0). 25 is 5 std on average.
PREPROCESSING_GAP = 25.0
_PREPROCESSING_PROBE = 32  # images run to the first BN layer


# said where synthetic images calibrate a network with depthwise convolutions at 4 bits or fewer
# (README, 'A handful of photos': measured on MobileNet v1 0.25/0.75 and EfficientNet-Lite0 W4A4)
PHOTOS_HINT = ("on networks with depthwise convolutions at 4 bits, synthetic images trail even a handful of "
               "photos like the model's inputs where measured; with 16 or more at hand, try `calib` with a folder "
               "of them (README, 'A handful of photos')")


# how far past the box preprocessed photos occupy (a share of its width, each side) a calibration
# value may lie before it counts as outside (resampling overshoots the box by a little), and the
# share of values outside beyond which quantize says so
_BOX_MARGIN = 0.05
_OUTSIDE_SHARE = 0.01


def _box_check(loaded: LoadedModel, config: QuantConfig, images: np.ndarray, calib_info: dict) -> Optional[float]:
    """Where the calibration images come ready-made (an .npz or an array, not an image folder
    this run preprocessed, nor images it synthesized) and the model's preprocessing is given, the
    share of their values outside the box photos occupy under it (:meth:`Preprocess.pixel_box`),
    said when above 1 %: a set made for another preprocessing, or raw pixels, quantizes to ranges
    the model never sees — on a model without BN statistics, with nothing else to tell."""
    source, channels = calib_info.get("source"), loaded.input.chw[0]
    if (config.preprocess is None or source is None or channels is None
            or (isinstance(source, str) and os.path.isdir(source))):
        return None
    low, high = config.preprocess.pixel_box(channels)
    margin = _BOX_MARGIN * (high - low)
    values = np.asarray(images, dtype=np.float32)
    share = float(np.mean((values < low - margin) | (values > high + margin)))
    if share > _OUTSIDE_SHARE:
        say(f"calibration: {share:.0%} of the values in {source} lie outside the box photos occupy under the "
            f"preprocessing given (per channel {_box_text(low)} to {_box_text(high)}); "
            "calibrated on them, the model's ranges fit inputs it will not see. Check the set was made for this "
            "`preprocess`")
    return round(share, 4)


def _box_text(bound: np.ndarray) -> str:
    return "/".join(f"{v:.3g}" for v in np.ravel(bound))


def _preprocessing_check(loaded: LoadedModel, images: np.ndarray, calib_info: dict) -> Optional[dict]:
    """Where the model keeps BN statistics and the calibration images are not drawn (noise, dead
    leaves), how far the images sit from its first BN layer's statistics (``first_bn`` in the
    calibration record), said when far: images in the wrong pixel scale, mean/std or channel
    order quantize to ranges the model never sees, silently. None where it cannot be measured."""
    method = calib_info.get("method")
    if (method in {m.value for m in SynthMethod if m.drawn}
            or not any(node.op_type == "BatchNormalization" for node in loaded.model.graph.node)):
        return None
    from .graph.bn_taps import first_bn_gap
    from .graph.to_torch import to_torch

    try:
        measured = first_bn_gap(to_torch(loaded), images[:_PREPROCESSING_PROBE])
    except (DsgonnxError, RuntimeError):  # a model torch cannot run (quantize itself needs no torch here)
        return None
    if measured is None:
        return None
    layer, gap = measured
    far = gap > PREPROCESSING_GAP
    if far:
        say(f"calibration: the images sit far from what the model was trained on: at its first BN layer ({layer}) "
            f"their mean and std are {math.sqrt(gap):.0f} running std off (preprocessed as in training: under 1). "
            "Check `preprocess` (mean, std, pixel scale, channel order): calibrated on them, the model's ranges fit "
            "inputs it will not see")
    return {"layer": layer, "gap": round(gap, 4), "far": far}


def _calibration_data(loaded: LoadedModel, config: QuantConfig):
    """(calibration images, held-out images or None, description, calibration files)."""
    start = time.perf_counter()
    # held out: to validate on without val_data, and for refine/qat/rounding to be checked on
    checked = config.refine is not None or config.qat is not None or config.weight_rounding() != Rounding.NEAREST
    holdout = config.holdout if checked or (config.validate and config.val_data is None) else 0
    if config.synthetic:
        from .synth import synthesize

        if holdout and None not in loaded.input.chw:  # (the synthesis counts them together, as `num_samples`)
            from .hardware import check_image_memory

            check_image_memory(config.num_samples + holdout, loaded.input.chw, ("num_samples", "holdout"))
        made_as = config.synth_config(config.num_samples + holdout,
                                      depthwise=bool(depthwise_layers(loaded.model, config.exclude)))
        # (what the decided method does not read is dropped here; _check_synthesis_used refuses what nothing reads)
        synthetic = synthesize(loaded, made_as, drop_unread=True).hold_out(holdout)  # the same split as `dsgonnx synthesize --holdout`
        settings = synthetic.meta["config"]
        chosen = {}
        # the alignment synth_config chose for images reconstruction or QAT trains on (the method
        # decided may not align BN at all)
        if made_as.alignment != config.synth.alignment and SynthMethod(synthetic.meta["method"]).needs_bn:
            chosen = {"alignment_choice": f"{made_as.alignment}: {_BATCH_FOR_TRAINING}"}
            say(f"quantize: synthesis held the batch's BN statistics, not each sample's, to the model's: {_BATCH_FOR_TRAINING}")
        leaves = config.synth.start is None and made_as.start == SynthStart.PROCEDURAL
        if leaves and SynthMethod(synthetic.meta["method"]).needs_bn:
            chosen["start_choice"] = f"{made_as.start}: {_LEAVES_FOR_RECONSTRUCTION}"
            say(f"quantize: synthesis started from dead-leaves images, not noise: {_LEAVES_FOR_RECONSTRUCTION}")
        info = {"method": synthetic.meta["method"], "num_samples": config.num_samples, "iters": settings["iters"],
                **({"requested": config.calib.value, "method_choice": synthetic.meta["method_choice"]}
                   if synthetic.meta.get("method_choice") else {}),
                "seconds": round(time.perf_counter() - start, 3), "device": synthetic.meta["device"],
                "diversity": synthetic.meta["diversity"], "holdout": holdout, "synth": settings, **chosen}
        return synthetic.images, synthetic.holdout, info, ()
    real = load_real_images(config.calib, loaded.input, config.num_samples, config.preprocess, holdout,
                            pixels=loaded.takes_pixels)
    held = real.holdout[:holdout] if real.holdout is not None and holdout else None
    info = {"method": real.method, "source": real.source, "num_samples": len(real.images), "iters": 0,
            "seconds": round(time.perf_counter() - start, 3), **({"holdout": len(held)} if held is not None else {}),
            **({"holdout_files": list(real.holdout_files)} if held is not None and real.holdout_files else {})}
    if len(real.images) < config.num_samples:
        say(f"quantize: {real.source} holds {len(real.images)} images to calibrate on, fewer than the "
            f"{config.num_samples} of `num_samples`: all {len(real.images)} are used")
    if held is None and holdout and checked and real.method != "real":
        say(f"quantize: {real.source} holds no held-out samples, so the models are checked on the calibration "
            "images (`dsgonnx synthesize --holdout N` keeps N aside)")
    elif held is None and holdout and checked:
        say(f"quantize: {real.source} has fewer than {holdout} images beside the {len(real.images)} calibrated on "
            "to hold out, so the models are checked on the calibration images")
    elif held is not None and real.method == "real":
        say(f"quantize: {len(held)} of the images in {real.source} not calibrated on are held out to check "
            + ("the models on" if checked else "the quantized model on (no `val_data`)"))
    return real.images, held, info, real.files


def _finish_model(path: Path, loaded: LoadedModel, bits: dict, calibration: dict, decisions: dict, sample: np.ndarray):
    """Give the model the file's input layout back, stamp metadata, run the ONNX checker and
    one ONNX Runtime inference (``sample``: NCHW)."""
    model = onnx.load(str(path))
    if loaded.layout == "NHWC":
        channels_last_input(model, loaded.input.name)
        decisions["input_layout"] = "NHWC: the file's input, transposed to NCHW in front of the quantized graph"
    if loaded.file_batch is not None:
        fixed_batch_interface(model, loaded.file_batch)
        sample = np.resize(sample, (loaded.file_batch, *sample.shape[1:]))
        decisions["input_batch"] = f"{loaded.file_batch}, as the file fixes it (worked on through a twin that takes any)"
    if loaded.file_ir_version is not None:
        decisions["ir_version"] = (f"{model.ir_version}: the file's {loaded.file_ir_version} is newer than ONNX Runtime "
                                   "reads (the same graph, worked on at the newest version it does)")
    if loaded.file_dtype == np.float16:
        file_interface(model, loaded.input.name, loaded.float16_outputs)
        decisions["input_type"] = "float16: the file's input and outputs, cast to and from the float32 quantized graph"
    elif loaded.file_dtype is not None:
        file_interface(model, loaded.input.name, (), input_type=helper.np_dtype_to_tensor_dtype(loaded.file_dtype))
        decisions["input_type"] = f"{loaded.file_dtype.name}: the file's input, cast to float32 in front of the quantized graph"
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
    outputs = ort_session(path).run(None, {loaded.input.name: loaded.in_file_layout(sample.astype(np.float32))})
    if not all(np.isfinite(o).all() for o in outputs):
        raise UnsupportedModelError("the quantized model produces NaN/Inf on a calibration image")


MIXED_PROBE_SAMPLES = 32  # one float-model run per quantized tensor: keep each probe cheap


def _choose_mixed(scratch: Path, float_path: Path, ranges, weights, activations, reduce_range, refined, correct,
                  images, holdout, batch: int, loaded: LoadedModel, config: QuantConfig, kept: set[str]):
    """Probe the model's tensors (``kept`` already at 8 bits) and pick those that stay at 8 bits
    (dsgonnx.sensitivity), measured on up to 32 held-out synthetic samples when there are some,
    else calibration images."""
    from .sensitivity import choose_8bit

    probe = scratch / "uniform.onnx"
    quantize_qdq(float_path, probe, ranges, weights, activations, per_channel=config.per_channel,
                 reduce_range=reduce_range, exclude=config.exclude, logits=config.logits,
                 refined=_refined_kept(refined, set()), learned_activations=_learned_kept(refined, set()), keep_8bit=kept)
    if correct is not None:
        correct(probe)
    samples = holdout if holdout is not None and len(holdout) else images
    samples = _whole_batches(samples[:MIXED_PROBE_SAMPLES], loaded)
    return choose_8bit(probe, float_path, loaded.input.name, samples, config.mixed_budget,
                       batch, kept)


def _equalize(prepared: Path, out: Path) -> tuple[Path, dict]:
    """Cross-layer equalization of the BN-folded model (dsgonnx.quant.equalize)."""
    from .quant.equalize import equalize

    model, report = equalize(onnx.load(str(prepared)))
    onnx.save(model, str(out))
    say(f"equalize: {report['pairs']} layer pairs, {report['sweeps']} sweeps"
        f"{'' if report['converged'] else ' (not converged)'}, {report['relu6_bounded']} ReLU6 bounds per channel")
    return out, report


class _BiasCorrector:
    """Subtracts each quantized layer's expected output shift (dsgonnx.quant.correct) in QDQ
    models of one float model; E[x] is worked out once (the mixed-precision probe, the final
    model and, with ``refine.correct_inside``, reconstruction share it). ``float_path``: the
    float model whose weights are the W of ΔW = Q(W) − W and whose activations give the
    empirical means — the one before reconstruction, the trained one after QAT. ``original``
    (the model with BN) gives the analytic means; None after equalization, which rescales the
    channels the BN statistics describe (every mean is then measured)."""

    def __init__(self, float_path: Path, original: Optional[onnx.ModelProto], loaded: LoadedModel, images,
                 batch: int, mode):
        self.float_path, self.original, self.loaded, self.images, self.batch, self.mode = (
            float_path, original, loaded, images, batch, mode)
        self._means, self._layers = None, set()

    @property
    def measured(self) -> bool:
        """Every mean is measured on the images (no BN statistics used)."""
        return self.mode == BiasCorrection.EMPIRICAL or self.original is None

    def __call__(self, qdq_path: Path) -> dict:
        from .quant.correct import correct_biases, correctable_layers

        means = self.means(correctable_layers(onnx.load(str(qdq_path))))
        report = correct_biases(qdq_path, onnx.load(str(self.float_path)), means)
        return {"mode": self.mode.value, **report, "means": self._means[1]}

    def means(self, layers: list[str]) -> dict:
        """Layer -> E[x] for ``layers`` (worked out once; again, for all, if a layer is new)."""
        from .quant.correct import input_means

        if self._means is None or not set(layers) <= self._layers:
            self._layers = set(layers) | (self._layers if self._means is not None else set())
            self._means = input_means(self.mode, self.original, self.float_path, sorted(self._layers),
                                      self.loaded.input.name, self.images, self.batch)
        return {name: self._means[0][name] for name in layers if name in self._means[0]}


def _refine(prepared: Path, out: Path, ranges, weights, activations, images, holdout, reduce_range, config: QuantConfig,
            kept: set[str], loaded: LoadedModel, calib_info: dict, corrector: Optional["_BiasCorrector"] = None):
    """Learn the weight rounding (``config.refine``) or train the model (``config.qat``) on the
    calibration images (dsgonnx.refine; imports torch) in the simulation of the QDQ model ORT
    writes for ``prepared`` (the ``kept`` tensors on the 8-bit grids); QAT may train on a
    generator's images instead (:func:`_qat_generator`), and with ``qat.start`` ``refine`` starts
    from a reconstruction (``config.refine``, else brecq's defaults). ``corrector``: the bias
    correction quantize will write (None: none), which ``refine.correct_inside`` simulates.
    Returns the trained result and the correction to write on it: ``corrector``, or, under
    ``--bias-correction auto`` where the reconstruction simulated the calibration images' means
    (``refine.inside_means`` ``calibration``) and those are dead-leaves images (``procedural``),
    a correction with those means: the file is then the model learned. Measured (README, "Bias
    correction inside the reconstruction"): with procedural images this gained on all three
    depthwise networks; with DSG's it lost 6.67 points on one, with Gaussian noise on both tried."""
    from .quant.bits import resolve_bits
    from .quant.placement import placement_of
    from .quant.qdq import excluded_nodes, quantized_weights, weight_top
    from .refine import refine_model

    prepared_model = onnx.load(str(prepared))
    exclude, _ = excluded_nodes(prepared_model, config.exclude, config.logits)
    placement = placement_of(prepared, ranges, weights, activations, per_channel=config.per_channel,
                             reduce_range=reduce_range, exclude=config.exclude, logits=config.logits, keep_8bit=kept)
    weights8, _ = resolve_bits(8, 8, config.target)
    common = dict(exclude=set(exclude), per_channel=config.per_channel, weight_top=weight_top(weights, reduce_range),
                  device=config.device, seed=config.seed,
                  weight_tops={name: weight_top(weights8, reduce_range) for name in kept})
    synthetic = calib_info.get("method") != "real"
    depthwise = depthwise_layers(prepared_model, config.exclude)
    if config.qat is not None:
        from .refine.qat import qat_model

        # start where quantize without --qat is (and what --fallback weighs it against); distil the
        # layers' outputs too unless the network has depthwise convolutions
        qat = config.qat.resolved(config.plain_rounding(), bool(depthwise))
        if config.qat.feature_weight is None:
            say(f"qat: feature distillation weight {qat.feature_weight:g} ("
                + (f"{len(depthwise)} depthwise convolutions" if depthwise else "no depthwise convolutions")
                + "; --qat-feature-weight sets it)")
        start = None
        if qat.start == "refine":  # reconstruct first, on the same images and grids; train from its result
            start = refine_model(prepared, out.with_name(f"start-{out.name}"), placement, images, holdout,
                                 config=(config.refine or RefineConfig()).resolved(config.plain_rounding(), False,
                                                                                   synthetic, bool(depthwise)),
                                 **common)
            start.release()
        return qat_model(prepared, out, placement, images, holdout, config=qat,
                         generator=_qat_generator(loaded, config, calib_info), start=start, **common), corrector
    refine = config.refine.resolved(config.plain_rounding(), corrector is not None, synthetic, bool(depthwise))
    means = written = None
    if refine.correct_inside:  # the means of the simulated correction, for every layer the QDQ model quantizes
        layers = [site.node.name for site in quantized_weights(prepared_model, exclude)
                  if site.node.op_type in ("Conv", "Gemm")]
        means = corrector.means(layers)
        if refine.inside_means == "calibration" and not corrector.measured:  # (measured: these already)
            # learn with each layer's input mean over the calibration images (and write them too
            # where those are dead leaves)
            measured = _BiasCorrector(prepared, None, loaded, images, corrector.batch, BiasCorrection.EMPIRICAL)
            means, written = measured.means(layers), means
            if corrector.mode == BiasCorrection.AUTO and calib_info.get("method") == SynthMethod.PROCEDURAL.value:
                corrector, written = measured, None
    return refine_model(prepared, out, placement, images, holdout, config=refine, input_means=means,
                        written_means=written, **common), corrector


def _round(prepared: Path, out: Path, weights, reduce_range: bool, config: QuantConfig, kept: set[str]):
    """The weights of ``prepared`` on their grids by ``config.rounding`` (dsgonnx.quant.rounding),
    the ``kept`` ones on the 8-bit grid; no data."""
    from .quant.bits import resolve_bits
    from .quant.qdq import excluded_nodes, ort_weight_range
    from .quant.rounding import squant_model
    from .refine.reconstruct import RefineResult

    started = time.perf_counter()
    exclude, _ = excluded_nodes(onnx.load(str(prepared)), config.exclude, config.logits)
    weights8, _ = resolve_bits(8, 8, config.target)
    eight_bit = ort_weight_range(weights8, reduce_range)
    grids, report = squant_model(prepared, out, exclude=set(exclude), per_channel=config.per_channel,
                                 weight_range=ort_weight_range(weights, reduce_range),
                                 weight_ranges={name: eight_bit for name in kept})
    report["seconds"] = round(time.perf_counter() - started, 3)
    if config.rounding == Rounding.AUTO:
        report["chosen_by"] = "auto: weights of 4 bits or fewer"
    say(f"rounding: {report['method']} on {report['weights']} weights, {report['rounded_other_way']} of "
        f"{report['values']} values rounded the other way")
    return RefineResult(path=out, weights=grids, report=report)


def _qat_generator(loaded: LoadedModel, config: QuantConfig, calib_info: dict):
    """What QAT's generator trains against (``qat.data`` ``generator`` or ``mixed``), or None to
    train on the calibration images (``calib``, and ``auto``: measured under MSE ranges, the
    fixed set of 100 DSG images beat the generator on ResNet-20 W4A4, 78.64 vs 77.73, and
    ResNet-56, 80.23 vs 74.51, in a third to two thirds of the time). The generator's loss
    follows the calibration method where not given: GDFQ's for zeroq, else DSG's."""
    from .refine.qat import GeneratorSource

    loss = config.qat_generator_loss(calib_info.get("method"))
    if loss is None:
        return None  # (a model without BN statistics is refused where the generator is built)
    box = None
    if loaded.takes_pixels:  # on the unit-pixel twin's scale with its box, as synthesis (inception's: u = -1 to 1)
        return GeneratorSource(model=unit_pixel_twin(loaded), loss=loss,
                               box=PRESETS["inception"].pixel_box(loaded.input.chw[0]), epsilon=config.synth.epsilon,
                               slack_reading=config.synth.slack_reading.value, unit_pixels=True)
    if config.preprocess is not None:
        box = config.preprocess.pixel_box(loaded.input.chw[0])
    return GeneratorSource(model=loaded, loss=loss, box=box, epsilon=config.synth.epsilon,
                           slack_reading=config.synth.slack_reading.value)


def _learning_key(report: dict) -> str:
    method = report.get("method")
    return "qat" if method == "qat" else "rounding" if method == Rounding.SQUANT.value else "refine"


FIDELITY_SAMPLES = 32


def _fidelity(refined, qdq_path: Path, images: np.ndarray, loaded: LoadedModel, label: str = "refine") -> dict:
    """How closely the trained simulation's logits follow the QDQ model just written (before
    bias correction; after it where the simulation held it, ``refine.correct_inside``) on up to
    32 calibration images; the simulation is released after."""
    from .refine.simulate import fidelity

    fixed = loaded.input.fixed_batch
    count = min(len(images), FIDELITY_SAMPLES)
    samples = images[: max(fixed, count // fixed * fixed) if fixed else count]
    exported = _logits(qdq_path, samples, loaded)
    figures = {**fidelity(refined.simulation(samples), exported), "samples": len(samples)}
    refined.release()
    refined.report["fidelity"] = figures
    sqnr = ("inf (identical logits)" if figures["max_abs_diff"] == 0 else
            "n/a (an output is not finite)" if figures["sqnr_db"] is None else f"{figures['sqnr_db']} dB")
    say(f"{label}: the simulation it trained follows the exported model with top-1 agreement "
        f"{figures['agreement']:.3f}, logit SQNR {sqnr} on {len(samples)} calibration images")
    return figures


FALLBACK_SAMPLES = 64


PLAIN_NAMES = {"plain": "plain rounding", "squant": "SQuant's rounding"}
UNCORRECTED = "uncorrected"
VARIANT_NAMES = {UNCORRECTED: "refined without bias correction"}
# the procedural probe's images: samples from this index on, so no calibration set of fewer
# samples made with the same seed holds one of them
PROBE_FIRST = 1_000_000


# the inversion probe's size; its seed is the run's plus PROBE_FIRST, so none of its procedural
# starts is an image of a calibration set made with the run's seed
INVERSION_PROBE_SAMPLES = 32


# what of the synthesis options still acts where quantize synthesizes no calibration images:
# the inversion probe's synthesis takes them but for these, its own (_independent_probes; it has
# no slack margins, nor DSG's per-sample terms) ...
_PROBE_OWN = {"alignment": None, "start": None, "generator": False, "swing": False, "slack": True, "lse": True,
              "epsilon": DEFAULT_EPSILON, "slack_reading": DEFAULT_SLACK_READING, "mix_models": ()}
# ... and QAT's generator with DSG's loss reads these (_qat_generator)
_QAT_GENERATOR_READS = ("epsilon", "slack_reading")


def _independent_probes(loaded: LoadedModel, config: QuantConfig, calib_info: dict, holdout,
                        learning: str) -> dict[str, dict]:
    """The images the fallback checks on besides the held-out samples (else the calibration
    images), each {"images", "seconds"}, drawn independently of the data the model learned from.

    "procedural images": dead leaves in the model's pixel box, data-free; left out where the
    held-out samples are procedural images already, and where they were synthesized from the
    model's BN statistics (DSG, ZeroQ): those decide alone. Beside held-out DSG samples the
    procedural probe vetoed the refined model in MobileNet v1 0.75 W4A4 (46.33 % top-1 on real
    images, SQuant's rounding written instead: 38.89) and in MobileNet v1 0.25 W4A4 (7.44 vs
    4.56) and W6A6 (53.33 vs nearest rounding's 54.00: 6 of 900 images, while the real
    images' logit SQNR favoured the refined model, 11.03 vs 10.87 dB); it changed nothing on
    ResNet-20 or EfficientNet-Lite0 W4A4 (README, "Held-out samples decide alone"). Held-out
    real images (files or rows of the calibration source not calibrated on) decide alone too:
    the procedural probe's three scored vetoes on real data dropped the model with the better
    top-1 on real images (README, "Held-out real images"). Without held-out samples the
    calibration images favour what was fitted to them, and the procedural probe stays.
    "inversion images": where the calibration images are procedural and the model learns
    from them (``--refine``, ``--qat``), procedural
    starts the model has turned towards its classes (``--calib inversion``): fresh procedural
    images cannot tell a model fitted to procedural images from one that follows the float
    model on what it was trained for. On BN-folded EfficientNet-Lite0 W4A4 they chose the
    refined model without bias correction (+4.1 dB over SQuant's rounding on them, −3.1 dB on
    real images: 40.56 % top-1 against 63.67); on 32 inversion images it is measurably less
    close than the bias-corrected refined model, which is kept instead (57.11 %; README,
    "BN-folded models"). ``config.fallback_probes`` names them instead of this rule.
    """
    wanted = _wanted_probes(config, calib_info, holdout, learning)
    if config.fallback_probes is None and "procedural" not in wanted and calib_info.get("method") != SynthMethod.PROCEDURAL.value:
        say(f"{learning}: the {len(holdout)} {held_out_name(calib_info['method'])} decide alone "
            "(--fallback-probes procedural checks procedural images beside them)")
    probes = {}
    if "procedural" in wanted:
        from .synth.procedural import procedural_images

        start = time.perf_counter()
        images = procedural_images(FALLBACK_SAMPLES, loaded.input.chw, config.seed, config.preprocess, PROBE_FIRST)
        probes["procedural images"] = {"images": images, "seconds": round(time.perf_counter() - start, 3)}
    if "inversion" in wanted:
        from .synth import SynthConfig, synthesize

        start = time.perf_counter()
        say(f"{learning}: {INVERSION_PROBE_SAMPLES} inversion images to check the learned model on "
            + ("(the calibration images are procedural)" if config.fallback_probes is None else "(--fallback-probes)"))
        # (the calibration synthesis's generator, swing and start are not the probes': inversion starts from leaves)
        probe_options = replace(config.synth, **_PROBE_OWN)
        made_as = SynthConfig.from_options(probe_options, method=SynthMethod.INVERSION,
                                           num_samples=INVERSION_PROBE_SAMPLES, iters=config.iters,
                                           seed=config.seed + PROBE_FIRST, device=config.device,
                                           preprocess=config.preprocess)
        images = synthesize(loaded, made_as, drop_unread=True).images
        probes["inversion images"] = {"images": images, "seconds": round(time.perf_counter() - start, 3)}
    return probes


def _wanted_probes(config: QuantConfig, calib_info: dict, holdout, learning: str) -> tuple[str, ...]:
    """The independent probes :func:`_independent_probes` makes: ``config.fallback_probes``, else
    by its rule."""
    if config.fallback_probes is not None:
        return tuple(config.fallback_probes)
    procedural = calib_info.get("method") == SynthMethod.PROCEDURAL.value
    held = holdout is not None and len(holdout) > 0
    real = calib_info.get("method") == "real"
    decide_alone = held and (procedural or real or _from_bn_statistics(calib_info))
    return (*(() if decide_alone else ("procedural",)),
            *(("inversion",) if procedural and learning in ("refine", "qat") else ()))


def _check_synthesis_used(config: QuantConfig, calib_info: dict, probes: tuple[str, ...]) -> None:
    """Refuse synthesis options that would change nothing. Their readers: the calibration
    synthesis (``calib_info``'s method, decided; what it does not read, :meth:`SynthOptions.unread`,
    e.g. any optimisation setting of drawn images), the inversion probe (every option but its own
    alignment, start, generator and swing, and what inversion does not read; and ``iters``) and
    QAT's generator (``epsilon``, ``slack_reading``). Calibration images from files (or a set made
    before) are not synthesized. Where ``auto`` decided the method, what nothing reads is said,
    not refused: the same command may serve models with and without BN statistics."""
    given = config.synth.given()
    method = calib_info.get("method")
    synthesized = SynthMethod(method) if config.synthetic else None
    read, iters_read = set(), False
    if synthesized is not None:
        unread, because = config.synth.unread(synthesized)
        read |= set(given) - set(unread)
        iters_read = not synthesized.drawn
    if "inversion" in probes:
        read |= set(given) - set(_PROBE_OWN) - set(config.synth.unread(SynthMethod.INVERSION)[0])
        iters_read = True
    if config.qat_generator_loss(method) == "dsg":
        read |= set(_QAT_GENERATOR_READS)
    unused = [f"`synth.{name}`" for name in given if name not in read]
    drawn_once = synthesized is not None and synthesized.drawn and config.iters == 0  # (what drawn images are)
    unused += ["`iters`"] if config.iters is not None and not iters_read and not drawn_once else []
    if not unused:
        return
    one = len(unused) == 1
    if synthesized is not None:
        named = f"{' and '.join(unused)} {'changes' if one else 'change'} nothing for `calib` {method}: {because}"
        if config.calib == SynthMethod.AUTO:  # given for whatever auto would decide (one command for many models)
            say(f"quantize: {named} (auto: {calib_info.get('method_choice')}); left out")
            return
        raise DataError(named)
    raise DataError(f"{', '.join(unused)} {'tunes' if one else 'tune'} synthesis, but the calibration images come "
                    f"from {calib_info.get('source', 'the data given')} and nothing here would use "
                    f"{'it' if one else 'them'}: leave {'it' if one else 'them'} out (or calibrate on a "
                    "synthesis method)")


def _held_name(calib_info: dict) -> str:
    """What the held-out samples are, in the fallback's check and its log lines."""
    return "held-out real images" if calib_info.get("method") == "real" else "held-out synthetic samples"


def _from_bn_statistics(calib_info: dict) -> bool:
    """Whether the calibration images were synthesized from the model's BN statistics."""
    method = calib_info.get("method")
    return method in {m.value for m in SynthMethod} and SynthMethod(method).needs_bn


def _against_plain(learned: Path, plain: dict[str, Path], float_path: Path, holdout, images, loaded: LoadedModel,
                   label: str, independent: Optional[dict[str, dict]] = None,
                   variants: Optional[dict[str, Path]] = None, held_as: str = "held-out synthetic samples",
                   noise: bool = False) -> dict:
    """Which QDQ model of one float model follows it most closely — ``learned`` (after
    reconstruction, QAT or SQuant's rounding), one of ``plain`` ("plain": nearest rounding of the
    float weights; "squant": SQuant's rounding of them), all bias-corrected, or one of the learned
    model's ``variants`` (``uncorrected``: the refined layers' biases left as they were) — by
    logit SQNR on up to 64 held-out samples, named ``held_as`` (else calibration images, which
    favour the learned model: it was fitted to them) and on each ``independent`` probe (name ->
    {"images", "seconds"}, :func:`_independent_probes`). ``noise``: the calibration images are
    Gaussian noise, and so the held-out samples: with an independent probe beside them they are
    reported and decide nothing.

    From nearest rounding, each next candidate (``plain``'s others in order, then ``learned``,
    then the ``variants``) replaces the one kept where it is at least as close on one probe and
    not measurably less close on any (see :func:`choose_closest`): a model that wins on the
    samples it was made from and loses on independent images is not kept.
    """
    from .validation.metrics import finite_or_none, sqnr_db, top1_agreement

    probe = holdout if holdout is not None and len(holdout) else images
    on = held_as if probe is holdout else "calibration images"
    paths = {**plain, "learned": learned, **(variants or {})}
    probes = {on: _whole_batches(probe[:FALLBACK_SAMPLES], loaded)}
    for where, probe_set in (independent or {}).items():
        probes[where] = _whole_batches(probe_set["images"], loaded)
    scores, errors = {}, {}
    for where, samples in probes.items():
        reference = _logits(float_path, samples, loaded)
        for name, path in paths.items():
            out = _logits(path, samples, loaded)
            scores.setdefault(where, {})[name] = {"sqnr_db": finite_or_none(sqnr_db(reference, out), 3),
                                                  "agreement": round(top1_agreement(reference, out), 4)}
            errors.setdefault(where, {})[name] = sample_errors(reference, out)
    order = ["plain", *(name for name in plain if name != "plain"), "learned", *(variants or {})]
    # held-out noise is drawn as the noise the model was fitted to and holds nothing of an image:
    # beside independent images it is reported, and they decide. Measured 2026-12-06 (README,
    # BN-folded models): on EfficientNet-Lite0 the noise kept out SQuant's rounding and brought in
    # reconstructions the procedural images ranked below it (W4A4: 20.56 % top-1 written, SQuant's
    # 25.78) and below nearest rounding (W6A6: 85.44, nearest 86.00); on ResNet-20 and MobileNet
    # v1 0.25 the procedural images alone make the same four choices the two probes made
    reported_only = (on,) if noise and independent else ()  # (calibration noise the more: it was fitted to it)
    if reported_only:
        say(f"{label}: the {on} are noise, as the calibration images: reported, the independent images decide")
    kept, steps = choose_closest(order, list(errors.values()), list(errors), reported_only=reported_only)
    names = {**PLAIN_NAMES, **VARIANT_NAMES, "learned": label}
    for where, probe_scores in scores.items():
        say(f"{label}: logit SQNR against the float model on {len(probes[where])} {where}: "
            + ", ".join(f"{figures['sqnr_db']} dB with {names[name]}" for name, figures in probe_scores.items()))
    for step in steps:
        say(f"{label}: {names[step['candidate']]} against {names[step['against']]}: "
            + "; ".join(f"{_signed(d['db'])} dB (90% interval {_signed(d['low'])} to {_signed(d['high'])}) on {where}"
                        for where, d in step["probes"].items())
            + (" — replaces it" if step["replaced"] else " — not kept"))
    say(f"{label}: kept {names[kept]}" + (f"; quantize without --{label} writes this same model" if kept in plain and
                                         label in ("qat", "refine") else ""))
    check = {"samples": len(probes[on]), "on": on, **scores[on], "kept": kept, "steps": steps,
             **({"reported_only": list(reported_only)} if reported_only else {})}
    for where, probe_set in (independent or {}).items():  # "procedural", "inversion"
        check[where.split()[0]] = {"samples": len(probes[where]), "seconds": probe_set["seconds"], **scores[where]}
    return check


def _signed(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def sample_errors(reference: np.ndarray, out: np.ndarray) -> Optional[np.ndarray]:
    """Each sample's squared logit error (float64), or None where an output is not finite."""
    diff = reference.astype(np.float64) - out.astype(np.float64)
    errors = np.sum(diff.reshape(len(diff), -1) ** 2, axis=1)
    return errors if np.all(np.isfinite(errors)) else None


# the paired bootstrap behind the choice: draws, and the one-sided level at which a candidate
# counts as less close than the model kept (its whole 90% interval below 0 dB)
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_LEVEL = 0.05


def paired_difference(kept: np.ndarray, candidate: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                      level: float = BOOTSTRAP_LEVEL, seed: int = 0) -> dict:
    """How much closer ``candidate`` follows the float model than ``kept`` on one probe, in dB
    of logit SQNR (the signal cancels: 10·log10 of kept's summed squared error over the
    candidate's), with the ``level`` and 1 − ``level`` quantiles of a paired bootstrap over
    the probe's samples. Deterministic for a given ``seed``."""
    tiny = np.finfo(np.float64).tiny

    def db(k, c):
        return 10.0 * np.log10((np.sum(k, axis=-1) + tiny) / (np.sum(c, axis=-1) + tiny))

    picks = np.random.default_rng(seed).integers(0, len(kept), size=(draws, len(kept)))
    spread = db(kept[picks], candidate[picks])
    low, high = np.quantile(spread, [level, 1.0 - level])
    return {"db": round(float(db(kept, candidate)), 3), "low": round(float(low), 3), "high": round(float(high), 3)}


def choose_closest(order: list[str], probes: list[dict[str, Optional[np.ndarray]]],
                   names: Optional[list[str]] = None, reported_only: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
    """The candidate kept, and the comparisons that chose it. ``probes``: per probe, each
    candidate's per-sample squared logit errors (None where its outputs were not finite, which
    counts as worse than any finite figure). ``order[0]`` is kept unless a later candidate
    follows the float model at least as closely on one probe (by summed error: SQNR) and is
    not measurably less close on any: on no probe is its paired-bootstrap interval wholly
    below the kept one's SQNR. A difference inside the probe's sampling error decides nothing
    against a candidate that wins elsewhere; a model that wins on the samples it was fitted
    to and clearly loses on independent images is not kept. A probe named in ``reported_only``
    is compared (the steps hold its figures) but decides nothing."""
    names = names or [f"probe {i}" for i in range(len(probes))]
    kept, steps = order[0], []
    for name in order[1:]:
        compared, better, worse = {}, False, False
        for where, errors in zip(names, probes):
            mine, theirs = errors.get(name), errors.get(kept)
            if mine is None or theirs is None:
                compared[where] = {"db": None, "low": None, "high": None}
                if where in reported_only:
                    continue
                better |= theirs is None
                worse |= mine is None and theirs is not None
                continue
            compared[where] = figures = paired_difference(theirs, mine)
            if where in reported_only:
                continue
            better |= figures["db"] >= 0
            worse |= figures["high"] < 0
        replaced = better and not worse
        steps.append({"candidate": name, "against": kept, "probes": compared, "replaced": replaced})
        if replaced:
            kept = name
    return kept, steps


def _whole_batches(samples: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """``samples`` cut (or repeated) to whole batches of a model whose batch size is fixed."""
    fixed = loaded.input.fixed_batch
    if not fixed or len(samples) % fixed == 0:
        return samples
    return np.resize(samples, (max(fixed, len(samples) // fixed * fixed), *samples.shape[1:]))


def _logits(path: Path, samples: np.ndarray, loaded: LoadedModel) -> np.ndarray:
    """The first output of the (scratch, NCHW) model at ``path`` on ``samples``, in the model's batches."""
    from .runtime import run_model

    session = ort_session(path)
    step = loaded.input.fixed_batch or len(samples)
    out = np.concatenate([run_model(session, {loaded.input.name: samples[i : i + step]}, path)[0]
                          for i in range(0, len(samples), step)])
    return out.reshape(len(out), -1)


def _refined_kept(refined, dropped: set[str]) -> Optional[dict]:
    """The learned grids to export, less those of ``dropped`` weights (mixed precision keeps
    them at 8 bits: ORT rounds the refined values on its own 8-bit grid)."""
    return {name: w for name, w in refined.weights.items() if name not in dropped} if refined else None


def _learned_kept(refined, dropped: set[str]) -> Optional[dict]:
    """The learned activation steps to export, less those of ``dropped`` tensors (at 8 bits
    they take ORT's 8-bit grid of their calibrated range)."""
    return {name: g for name, g in refined.activations.items() if name not in dropped} if refined else None


def _validate_config(config: QuantConfig, **more) -> ValidateConfig:
    return ValidateConfig(data=config.val_data, preprocess=config.preprocess, class_list=config.class_list,
                          provider=config.provider, max_drop=config.max_drop, min_agreement=config.min_agreement,
                          **more)


def _validate(loaded: LoadedModel, written: Path, output: Path, config: QuantConfig, holdout, used_files, bits,
              calibration, refine=None):
    """Validate the model ``written`` (to be published as ``output``; the report names it and the
    model file quantized) on ``config.val_data`` (``used_files``, calibrated on or held out to
    decide on, left out), else on the held-out samples (agreement with the float model). The
    report is written, shown and gated by the caller, once the model is in place."""
    from .validation import validate

    extra = {"bits": bits, "simulated": bits["simulated"], "calibration": calibration}
    if refine:
        extra[_learning_key(refine)] = refine
    vconfig = _validate_config(config, extra=extra, exclude_files=frozenset(used_files))
    if config.val_data is None:
        if holdout is None or not len(holdout):
            say("validate: no `val_data` and no held-out samples; skipped")
            return None
        report = validate(loaded.original, written, vconfig, images=loaded.in_file_layout(holdout))
    else:
        report = validate(loaded.original, written, vconfig)
    return replace(report, fp_model=str(loaded.source), q_model=str(output))  # the user's files, not the copies read


__all__ = ["QuantResult", "default_output", "quantize"]
