"""dsgonnx: data-free quantization of ONNX image classifiers with Diverse Sample Generation.

Public API (imports are lazy: ``import dsgonnx`` pulls in neither torch nor onnxruntime)::

    dsgonnx.inspect_model(path)                 -> dict         (dsgonnx inspect)
    dsgonnx.synthesize(model, SynthConfig(...)) -> SyntheticSet (dsgonnx synthesize)
    dsgonnx.quantize(model, QuantConfig(...))   -> QuantResult  (dsgonnx quantize)
    dsgonnx.validate(fp, q, ValidateConfig(...)) -> ValidationReport (dsgonnx validate)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "inspect_model": "dsgonnx.inspection",
    "synthesize": "dsgonnx.synth",
    "SynthConfig": "dsgonnx.synth",
    "SyntheticSet": "dsgonnx.artifacts",
    "quantize": "dsgonnx.pipeline",
    "QuantConfig": "dsgonnx.quant.config",
    "QuantResult": "dsgonnx.pipeline",
    "validate": "dsgonnx.validate",
    "ValidateConfig": "dsgonnx.validate",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsgonnx' has no attribute {name!r}")


__all__ = ["__version__", *_EXPORTS]
