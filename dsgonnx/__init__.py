"""dsgonnx: data-free quantization of ONNX image classifiers with Diverse Sample Generation.

The public API — everything the command line uses, and all it may use (a test checks
that). Imports are lazy: ``import dsgonnx`` pulls in neither torch nor onnxruntime, and
the configuration (:mod:`dsgonnx.config`) never does::

    dsgonnx.inspect(path)                         -> dict          (dsgonnx inspect)
    dsgonnx.synthesize(model, SynthConfig(...))   -> SyntheticSet  (dsgonnx synthesize)
    dsgonnx.quantize(model, QuantConfig(...))     -> QuantResult   (dsgonnx quantize)
    dsgonnx.validate(fp, q, ValidateConfig(...))  -> ValidationReport (dsgonnx validate)
    dsgonnx.analyze(model, QuantConfig(...))      -> AnalysisReport (dsgonnx analyze)

Progress goes to the ``dsgonnx`` logger (INFO); errors are :class:`DsgonnxError`
subclasses whose messages name the parameters in backquotes.
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

logging.getLogger("dsgonnx").addHandler(logging.NullHandler())

_CONFIG = ("Alignment", "BiasCorrection", "Calibrator", "Device", "DeviceDefaults", "LogitsPolicy", "PoolRange", "Provider", "QatConfig", "QuantConfig", "RefineConfig",
           "RefineMethod", "Rounding", "SUPPORTED_BITS", "SlackReading", "SynthConfig", "SynthMethod", "SynthOptions", "SynthStart", "Target",
           "ValidateConfig", "DEFAULT_BATCH_SIZE", "DEFAULT_HOLDOUT", "device_defaults")
_EXPORTS = {
    **{name: "dsgonnx.config" for name in _CONFIG},
    "inspect": "dsgonnx.api",
    "synthesize": "dsgonnx.api",
    "format_inspection": "dsgonnx.inspection",
    "analyze": "dsgonnx.sensitivity",
    "AnalysisReport": "dsgonnx.sensitivity",
    "quantize": "dsgonnx.pipeline",
    "QuantResult": "dsgonnx.pipeline",
    "validate": "dsgonnx.validation",
    "check_gate": "dsgonnx.validation",
    "ValidationReport": "dsgonnx.validation",
    "SyntheticSet": "dsgonnx.artifacts",
    "is_writer": "dsgonnx.distributed",
    "Preprocess": "dsgonnx.preprocess",
    "PRESETS": "dsgonnx.preprocess",
    "preprocess_from_preset": "dsgonnx.preprocess",
    "DsgonnxError": "dsgonnx.errors",
    "DataError": "dsgonnx.errors",
    "AccuracyGateError": "dsgonnx.errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsgonnx' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


__all__ = ["__version__", *_EXPORTS]
