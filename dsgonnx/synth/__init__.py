"""Calibration-image synthesis: Gaussian noise, ZeroQ and DSG (imports torch)."""

from ..config import SynthConfig, SynthMethod
from .generator import SynthesisError, synthesize

METHODS = SynthMethod.values()

__all__ = ["METHODS", "SynthConfig", "SynthesisError", "synthesize"]
