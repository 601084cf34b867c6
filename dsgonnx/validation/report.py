"""The validation report: one JSON object with stable keys, and a table for people.

Keys (schema_version 1). Every key is always present; ``null`` means "does not apply"
(e.g. accuracies without labels). Accuracies are in **percent** (0–100), drops in
**percentage points**, ``agreement`` is a **fraction** (0–1). "fp32" names the reference,
unquantized model even when its input is float16.

=========================  ===================================================================
key                        meaning
=========================  ===================================================================
schema_version             1; bumped when a key changes meaning or disappears
dsgonnx_version            version of dsgonnx that wrote the report
models.fp32 / .quantized   the two model paths as given
data                       {kind: image-folder | image-files | npz | in-memory, source,
                           num_samples, labelled, num_class_folders, preprocess: the resolved
                           recipe (mean, std, resize, crop, channel_order, pixel_scale,
                           crop_fraction, preset) or null for preprocessed arrays}
num_samples                number of samples both models ran on
num_classes                number of classes in the models' output (2 for a one-output binary head)
labelled                   whether accuracies could be computed
output_kind                "logits", or "probabilities" when the FP model already ends in a
                           softmax (then KL uses its outputs as they are); "binary logit" or
                           "binary probability" for a one-output head, scored as two classes
                           (class 1 when the logit > 0 / the probability > 0.5)
fp32.top1 / fp32.top5      FP model accuracy, percent (top5 null below 5 classes)
quantized.top1 / .top5     quantized model accuracy, percent
drop_top1 / drop_top5      fp32 minus quantized accuracy, percentage points (negative: the
                           quantized model scored higher)
agreement                  fraction of samples whose top-1 class is the same in both models
sqnr_db                    10·log10(Σ fp² / Σ (fp − q)²) over all outputs, dB; null when
                           not finite: identical outputs (+inf; the table says so) or
                           NaN/inf in an output (see nonfinite_outputs)
kl                         mean over samples of KL(softmax(fp) ‖ softmax(q)), nats
nonfinite_outputs          {fp32, quantized}: samples whose output has NaN or ±inf
providers                  {fp32, quantized}: session.get_providers() of the sessions that ran
provider_requested         auto | cuda | cpu
onnxruntime                onnxruntime version
cpu                        {machine, model, isa ("AVX2 AVX-512 VNNI", "unknown", ...),
                           avx2, avx512, vnni}: int8 kernels depend on these
arithmetic                 native: the quantized model as ORT runs it on this machine (fused
                           integer kernels); exact: its QDQ graph as written (``--exact``)
batch_size                 samples per inference call (1 for models with a fixed batch of 1)
latency_ms.fp32 / .quantized  median wall time of one inference call of batch_size samples, ms,
                           after one warm-up call, over the full batches (all batches if none
                           is full), both models timed on the same batches
latency_batches            how many calls the medians are over
gate                       {max_drop, min_agreement: the thresholds or null, passed: true /
                           false / null (no threshold), message: one line}
per_tensor                 null unless asked for (``validate --per-tensor``): {num_samples,
                           arithmetic ("exact": the QDQ graph as written), tensors: one
                           {tensor, sqnr_db, grid_sqnr_db, clipped} per activation the
                           quantized model quantizes, in the fp32 model's order (dsgonnx.
                           validation.per_tensor: the quantized model's value against the
                           fp32 tensor, the fp32 tensor on its grid alone, the share of it
                           outside the grid's range; dB null when not finite), unmatched:
                           quantized tensors the fp32 model has no tensor of that name for}
bits, simulated,           only in reports written by ``dsgonnx quantize``: the quantization
calibration                settings; calibration = {method, num_samples, iters, seconds}
=========================  ===================================================================
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from dsgonnx.artifacts import cannot_create_in, name_too_long, same_file
from dsgonnx.errors import DsgonnxError
from dsgonnx.preprocess import Preprocess
from dsgonnx.validation.metrics import Metrics, finite_or_none
from dsgonnx.validation.per_tensor import PerTensor

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GateResult:
    """Outcome of the accuracy gate; ``passed`` is None when no threshold was set."""

    max_drop: float | None
    min_agreement: float | None
    passed: bool | None
    message: str

    def to_dict(self) -> dict:
        return {"max_drop": self.max_drop, "min_agreement": self.min_agreement, "passed": self.passed, "message": self.message}


@dataclass(frozen=True)
class ValidationReport:
    """Everything one validation found; :meth:`to_dict` is the documented JSON."""

    fp_model: str
    q_model: str
    metrics: Metrics
    data: dict
    providers: dict[str, list[str]]
    provider_requested: str
    onnxruntime_version: str
    cpu: dict
    batch_size: int
    latency_ms: dict[str, float | None]
    latency_batches: int
    gate: GateResult | None = None
    arithmetic: str = "native"
    per_tensor: PerTensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Convenience views used by the gate and by callers.
    @property
    def labelled(self) -> bool:
        return self.metrics.labelled

    @property
    def drop_top1(self) -> float | None:
        return self.metrics.drop_top1

    @property
    def agreement(self) -> float:
        return self.metrics.agreement

    def with_gate(self, gate: GateResult) -> ValidationReport:
        return replace(self, gate=gate)

    def to_dict(self) -> dict:
        """The JSON object documented in this module's docstring."""
        m = self.metrics
        report = {
            "schema_version": SCHEMA_VERSION,
            "dsgonnx_version": package_version(),
            "models": {"fp32": self.fp_model, "quantized": self.q_model},
            "data": self.data,
            "num_samples": m.num_samples,
            "num_classes": m.num_classes,
            "labelled": m.labelled,
            "output_kind": m.output_kind,
            "fp32": {"top1": m.fp_top1, "top5": m.fp_top5},
            "quantized": {"top1": m.q_top1, "top5": m.q_top5},
            "drop_top1": m.drop_top1,
            "drop_top5": m.drop_top5,
            "agreement": m.agreement,
            "sqnr_db": finite_or_none(m.sqnr_db),
            "kl": finite_or_none(m.kl),
            "nonfinite_outputs": {"fp32": m.nonfinite_fp, "quantized": m.nonfinite_q},
            "providers": self.providers,
            "provider_requested": self.provider_requested,
            "onnxruntime": self.onnxruntime_version,
            "cpu": self.cpu,
            "arithmetic": self.arithmetic,
            "batch_size": self.batch_size,
            "latency_ms": dict(self.latency_ms),
            "latency_batches": self.latency_batches,
            "gate": self.gate.to_dict() if self.gate else GateResult(None, None, None, "no gate").to_dict(),
            "per_tensor": self.per_tensor.to_dict() if self.per_tensor else None,
        }
        clash = sorted(set(self.extra) & set(report))
        if clash:
            raise ValueError(f"extra report fields would overwrite standard keys: {clash}")
        report.update(self.extra)
        return report

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False, default=json_value) + "\n"

    def table(self) -> str:
        """A readable summary for stdout."""
        m = self.metrics
        rows = [
            f"dsgonnx validate: {m.num_samples} samples, {m.num_classes} classes, {_describe_data(self.data)}",
            f"  fp32:      {self.fp_model}",
            f"  quantized: {self.q_model}",
            "",
            f"  {'':<22}{'fp32':>10}{'quantized':>12}{'change':>10}",
        ]
        if m.labelled:
            rows.append(_accuracy_row("top-1 accuracy (%)", m.fp_top1, m.q_top1, m.drop_top1))
            if m.fp_top5 is not None:
                rows.append(_accuracy_row("top-5 accuracy (%)", m.fp_top5, m.q_top5, m.drop_top5))
        else:
            rows.append(f"  {'accuracy':<22}{'no labels':>10}")
        fp_ms, q_ms = self.latency_ms.get("fp32"), self.latency_ms.get("quantized")
        speed = f"{fp_ms / q_ms:.2f}x" if fp_ms and q_ms else "-"
        rows.append(f"  {f'latency (ms/batch {self.batch_size})':<22}{_num(fp_ms, digits=3):>10}{_num(q_ms, digits=3):>12}{speed:>10}")
        rows += [
            "",
            f"  top-1 agreement   {m.agreement:.4f}",
            f"  output SQNR       {'inf (identical outputs)' if m.sqnr_db == float('inf') else _num(m.sqnr_db, ' dB')}",
            f"  KL(fp || q)       {_num(m.kl, ' nats', digits=4)}  ({m.output_kind})",
        ]
        if m.nonfinite_fp or m.nonfinite_q:
            rows.append(f"  non-finite outputs  fp32 {m.nonfinite_fp}, quantized {m.nonfinite_q}")
        rows += [
            f"  providers         fp32 {', '.join(self.providers['fp32'])}; quantized {', '.join(self.providers['quantized'])}",
            f"  onnxruntime       {self.onnxruntime_version}; CPU {self.cpu.get('model') or '?'} ({self.cpu.get('isa')})",
        ]
        if self.arithmetic == "exact":
            rows.append("  arithmetic        exact: the quantized model's QDQ graph as written (--exact)")
        if self.gate is not None and self.gate.passed is not None:
            rows.append(f"  gate              {'PASSED' if self.gate.passed else 'FAILED'}: {self.gate.message}")
        if self.per_tensor is not None:
            rows += ["", self.per_tensor.table()]
        return "\n".join(rows)


def check_report_path(path: str | None, inputs: Mapping[str, Any] = {}) -> None:
    """Fail early (before any work) when the report could not be written, or would replace one
    of ``inputs`` (what each is, e.g. "the quantized model" -> its path, None or not a path)."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise DsgonnxError(f"`report_path` {path} is a folder; give a file name")
    clash = same_file(path, inputs)
    if clash is not None:
        raise DsgonnxError(f"`report_path` {path} is {clash}; give another file for the report")
    if not os.path.isdir(folder):
        raise DsgonnxError(f"`report_path`: folder {folder} does not exist")
    why = cannot_create_in(folder)
    if why is not None:
        raise DsgonnxError(f"`report_path`: folder {folder} is not writable ({why})")
    why = name_too_long(path)
    if why is not None:
        raise DsgonnxError(f"`report_path`: {why}")


def write_report(report: ValidationReport, path: str) -> None:
    """Write the JSON atomically (:func:`dsgonnx.artifacts.write_atomically`: a temporary file
    in the same folder, fsync, the umask's permissions, a rename)."""
    from pathlib import Path

    from dsgonnx.artifacts import write_atomically

    text = report.to_json()
    try:
        write_atomically(Path(path), lambda handle: handle.write(text.encode("utf-8")))
    except OSError as exc:
        raise DsgonnxError(f"cannot write report {path}: {exc}") from None


def package_version() -> str:
    try:
        return importlib.metadata.version("dsgonnx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def json_value(value):
    """numpy scalars and arrays, paths and other objects that callers put in ``extra``."""
    if hasattr(value, "tolist"):  # numpy scalar or array
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"report field of type {type(value).__name__} is not JSON-serialisable")


def _num(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}{unit}"


def _accuracy_row(name: str, fp: float | None, q: float | None, drop: float | None) -> str:
    change = f"{-drop:+.2f}" if drop is not None else "-"
    return f"  {name:<22}{_num(fp):>10}{_num(q):>12}{change:>10}"


def _describe_data(data: dict) -> str:
    text = f"{data['kind']} {data['source']}" if data.get("source") else "images in memory"
    if data.get("preprocess"):
        text += f"\n  preprocess {Preprocess(**data['preprocess']).describe()}"
    return text
