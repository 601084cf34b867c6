"""Reconstruction PTQ (AdaRound, BRECQ/QDrop) in the torch twin of the model; imports torch."""

from ..config import RefineConfig, RefineMethod
from .reconstruct import RefinedWeight, RefineResult, refine_model

METHODS = RefineMethod.values()

__all__ = ["METHODS", "RefineConfig", "RefineResult", "RefinedWeight", "refine_model"]
