"""``validate()``: run the FP and the quantized model on the same samples and compare.

Order of work, so that bad input fails fast (exit 2) and leaves no file behind: report
path, model files and sessions, shared input, data source and thresholds, then the first
batch (output classes vs labels / class folders), then the remaining batches, metrics, gate
verdict, and last the report file.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from dsgonnx.config import DEFAULT_BATCH_SIZE, ValidateConfig
from dsgonnx.errors import InputSpecError
from dsgonnx.hardware import cpu_info
from dsgonnx.validation.data import Dataset, open_dataset
from dsgonnx.validation.gate import check_thresholds, evaluate_gate
from dsgonnx.validation.metrics import compare_outputs, num_classes
from dsgonnx.validation.per_tensor import per_tensor_errors, read_quantized_activations
from dsgonnx.validation.report import ValidationReport, check_report_path, json_value, write_report
from dsgonnx.validation.sessions import ModelRunner, open_models, read_model_io, shared_input


def validate(
    fp_model_path: str,
    q_model_path: str,
    config: ValidateConfig | None = None,
    *,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> ValidationReport:
    """Compare the two models on ``config.data`` or on ``images`` (model input space, e.g.
    held-out synthetic samples — never the calibration ones) and return the report.

    The report carries the gate's verdict for ``config.max_drop`` / ``config.min_agreement``
    but a failed gate does not raise here: call :func:`check_gate` for that, after the
    report has been written and shown. Bad input raises a :class:`DsgonnxError` (exit 2).
    """
    config = config or ValidateConfig()
    json.dumps(dict(config.extra), allow_nan=False, default=json_value)  # a caller's bug: fail before any work
    fp_model_path, q_model_path = str(fp_model_path), str(q_model_path)
    data = None if config.data is None else str(config.data)
    check_report_path(config.report_path, {"the FP model": fp_model_path, "the quantized model": q_model_path,
                                           "`data`": data, "`class_list`": config.class_list})
    fp, q = open_models(fp_model_path, q_model_path, config.provider, exact=config.exact)
    spec = shared_input(fp.io, q.io)
    quantized = read_quantized_activations(q_model_path) if config.per_tensor else None
    dataset = open_dataset(spec, data, config.preprocess, config.class_list, images, labels, config.exclude_files)
    check_thresholds(config.max_drop, config.min_agreement, dataset.labels is not None)
    batch_size = spec.fixed_batch or min(config.batch_size, dataset.size)
    run = _run_both(fp, q, dataset, batch_size, padded=spec.fixed_batch is not None)
    per_tensor = None if quantized is None else per_tensor_errors(fp_model_path, quantized, dataset, spec.fixed_batch)

    report = ValidationReport(
        fp_model=fp_model_path,
        q_model=q_model_path,
        metrics=compare_outputs(run.fp_outputs, run.q_outputs, dataset.labels),
        data=dataset.to_dict(),
        providers={"fp32": fp.providers, "quantized": q.providers},
        provider_requested=config.provider,
        onnxruntime_version=ort.__version__,
        cpu=cpu_info().to_dict(),
        batch_size=batch_size,
        latency_ms={"fp32": run.fp_latency_ms, "quantized": run.q_latency_ms},
        latency_batches=run.timed_batches,
        arithmetic="exact" if config.exact else "native",
        per_tensor=per_tensor,
        extra=dict(config.extra),
    )
    report.to_dict()  # fail on clashing extra fields before anything is written
    report = report.with_gate(evaluate_gate(report, config.max_drop, config.min_agreement))
    if config.report_path:
        write_report(report, config.report_path)
    return report


def check_data(fp_model_path: str, config: ValidateConfig) -> None:
    """Refuse, before any other work, what :func:`validate` would refuse in ``config.data``
    compared with the float model alone: a path that is no data, images the model cannot take,
    class folders or a class list that do not match its classes, labels out of its range, a
    gate its data cannot serve (``quantize`` calls it before its minutes; an image that cannot
    be decoded is found when it is read)."""
    from dsgonnx.runtime import ort_session

    session = ort_session(str(fp_model_path))
    runner = ModelRunner(read_model_io(str(fp_model_path), session), session)
    spec = shared_input(runner.io, runner.io)
    dataset = open_dataset(spec, str(config.data), config.preprocess, config.class_list,
                           exclude_files=config.exclude_files)
    check_thresholds(config.max_drop, config.min_agreement, dataset.labels is not None)
    first = dataset.batch(0, 1)
    if spec.fixed_batch:
        first = np.repeat(first, spec.fixed_batch, axis=0)
    dataset.check_against_classes(num_classes(runner.run(first)[0]))


@dataclass
class _Run:
    fp_outputs: np.ndarray
    q_outputs: np.ndarray
    fp_latency_ms: float | None
    q_latency_ms: float | None
    timed_batches: int


def _run_both(fp: ModelRunner, q: ModelRunner, dataset: Dataset, batch_size: int, padded: bool) -> _Run:
    """Both models on every batch, alternating, so that they are timed on the same inputs."""
    fp_outputs, q_outputs, timings = [], [], []
    for start in range(0, dataset.size, batch_size):
        count = min(batch_size, dataset.size - start)
        batch = dataset.batch(start, start + count)
        if padded and count < batch_size:  # a fixed-batch model: fill with copies, drop their outputs
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        if start == 0:  # warm-up (not timed), and the class checks before any real work
            _check_outputs(fp.run(batch)[0], q.run(batch)[0], dataset)
        fp_out, fp_ms = fp.run(batch)
        q_out, q_ms = q.run(batch)
        fp_outputs.append(fp_out[:count])
        q_outputs.append(q_out[:count])
        timings.append((fp_ms, q_ms, count == batch_size))
    full = [t for t in timings if t[2]] or timings
    return _Run(
        fp_outputs=np.concatenate(fp_outputs),
        q_outputs=np.concatenate(q_outputs),
        fp_latency_ms=statistics.median(t[0] for t in full),
        q_latency_ms=statistics.median(t[1] for t in full),
        timed_batches=len(full),
    )


def _check_outputs(fp_out: np.ndarray, q_out: np.ndarray, dataset: Dataset) -> None:
    if fp_out.shape[1] != q_out.shape[1]:
        raise InputSpecError(
            f"the models output different numbers of classes: {fp_out.shape[1]} (fp32) vs {q_out.shape[1]} (quantized)"
        )
    dataset.check_against_classes(num_classes(fp_out))
