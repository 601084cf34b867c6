"""Calibration-image synthesis: Gaussian noise, ZeroQ and DSG (imports torch)."""

from .config import METHODS, SynthConfig
from .generator import SynthesisError, synthesize

__all__ = ["METHODS", "SynthConfig", "SynthesisError", "synthesize"]
