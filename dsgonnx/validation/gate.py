"""The CI gate: fail (exit 1) when the quantized model lost too much.

Two thresholds, either or both:

* ``max_drop`` (percentage points): fails when ``drop_top1 > max_drop``. It needs labels;
  asking for it on unlabelled data is an input error (exit 2), never a silent pass.
* ``min_agreement`` (fraction 0–1): fails when top-1 agreement ``< min_agreement``; works
  with or without labels (the issue's gate for unlabelled or synthetic samples).
"""

from __future__ import annotations

from dsgonnx.config import check_thresholds as check_values
from dsgonnx.errors import AccuracyGateError, DsgonnxError
from dsgonnx.validation.report import GateResult, ValidationReport

# Drops are exact ratios of counts; this only absorbs float noise in user thresholds.
_EPSILON = 1e-9


def check_thresholds(max_drop: float | None, min_agreement: float | None, labelled: bool | None = None) -> None:
    """Reject thresholds that cannot be evaluated (exit 2). ``labelled=None``: not known yet."""
    check_values(max_drop, min_agreement)
    if max_drop is not None and labelled is False:
        raise DsgonnxError(
            "`max_drop` needs labelled data (class sub-folders, or 'labels' in the .npz); "
            "for unlabelled data gate on `min_agreement`"
        )


def evaluate_gate(report: ValidationReport, max_drop: float | None = None, min_agreement: float | None = None) -> GateResult:
    """The gate's verdict on ``report`` without raising for a failed gate."""
    check_thresholds(max_drop, min_agreement, report.labelled)
    failures, passes = [], []
    if max_drop is not None:
        drop = report.drop_top1
        line = f"top-1 dropped {drop:.2f} points ({report.metrics.fp_top1:.2f}% -> {report.metrics.q_top1:.2f}%)"
        if drop > max_drop + _EPSILON:
            failures.append(f"{line}, {drop - max_drop:.2f} points more than `max_drop` {max_drop:g}")
        else:
            passes.append(f"{line}, within `max_drop` {max_drop:g}")
    if min_agreement is not None:
        agreement = report.agreement
        line = f"top-1 agreement {agreement:.4f}"
        if agreement < min_agreement - _EPSILON:
            failures.append(f"{line} is {min_agreement - agreement:.4f} below `min_agreement` {min_agreement:g}")
        else:
            passes.append(f"{line} >= `min_agreement` {min_agreement:g}")
    if failures:
        return GateResult(max_drop, min_agreement, False, "accuracy gate failed: " + "; ".join(failures))
    if passes:
        return GateResult(max_drop, min_agreement, True, "; ".join(passes))
    return GateResult(None, None, None, "no gate (give `max_drop` and/or `min_agreement`)")


def check_gate(report: ValidationReport, max_drop: float | None = None, min_agreement: float | None = None) -> GateResult:
    """:func:`evaluate_gate`, raising :class:`AccuracyGateError` (exit 1) when it fails."""
    result = evaluate_gate(report, max_drop, min_agreement)
    if result.passed is False:
        raise AccuracyGateError(result.message)
    return result
