"""Errors the library raises for problems the user can fix.

Every error here means "bad input or unsupported model", never "bug in dsgonnx". The command
line turns them into one line on stderr and the error's ``exit_code`` (2 for bad input,
1 for a failed accuracy gate); anything else escaping the library is a bug.
"""

from __future__ import annotations


class DsgonnxError(Exception):
    """Base class: a problem with the user's input, reported as one line."""

    exit_code = 2


class ModelLoadError(DsgonnxError):
    """The file is missing, not ONNX, truncated, or fails the ONNX checker."""


class InputSpecError(DsgonnxError):
    """The image input cannot be found or its shape cannot be resolved."""


class UnsupportedModelError(DsgonnxError):
    """The model uses an operator (or operator version) dsgonnx cannot convert."""


class ParityError(DsgonnxError):
    """The torch conversion does not reproduce ONNX Runtime's outputs."""


class NoBatchNormError(DsgonnxError):
    """The model carries no BatchNorm statistics (e.g. BN was folded into Conv)."""


class SynthesisError(DsgonnxError):
    """Synthesis diverged (NaN/Inf loss) or cannot run as configured."""


class DataError(DsgonnxError):
    """Images, labels or an .npz file that cannot be used as given."""


class AccuracyGateError(DsgonnxError):
    """The quantized model lost more accuracy than the gate allows."""

    exit_code = 1
