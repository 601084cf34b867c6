"""Validation of a quantized ONNX classifier against its FP original, and the CI gate.

Typical use (``dsgonnx validate`` and ``dsgonnx quantize`` do exactly this)::

    from dsgonnx import ValidateConfig, check_gate, preprocess_from_preset, validate

    config = ValidateConfig(data="images/", preprocess=preprocess_from_preset("imagenet"),
                            max_drop=1.0, report_path="report.json")
    report = validate("model.onnx", "model.int8.onnx", config)   # writes report.json
    print(report.table())
    check_gate(report, config.max_drop, config.min_agreement)    # AccuracyGateError: exit 1

Modules: ``sessions`` (ONNX Runtime sessions, providers, the shared input), ``data``
(image folders, .npz, arrays), ``metrics`` (numpy definitions), ``per_tensor`` (every
quantized activation against the float model's, ``ValidateConfig.per_tensor``), ``report``
(the JSON keys, documented in its docstring, and the table), ``gate``, ``core`` (``validate``). Nothing
here imports torch: validation must work where only onnxruntime is installed.
"""

from dsgonnx.config import DEFAULT_BATCH_SIZE, ValidateConfig
from dsgonnx.validation.core import validate
from dsgonnx.validation.gate import check_gate, evaluate_gate
from dsgonnx.validation.report import GateResult, ValidationReport, write_report

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "GateResult",
    "ValidateConfig",
    "ValidationReport",
    "check_gate",
    "evaluate_gate",
    "validate",
    "write_report",
]
