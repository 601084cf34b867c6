"""Quantization to QDQ ONNX with ONNX Runtime (imports onnx/onnxruntime, never torch)."""

from ..config import QuantConfig
from .bits import SUPPORTED_BITS, TARGETS, BitSpec, resolve_bits
from .calibrate import CALIBRATORS
from .qdq import LOGITS_POLICIES

__all__ = ["BitSpec", "CALIBRATORS", "LOGITS_POLICIES", "QuantConfig", "SUPPORTED_BITS", "TARGETS", "resolve_bits"]
