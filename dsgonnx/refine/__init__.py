"""Reconstruction PTQ (AdaRound, BRECQ/QDrop) in the torch twin of the model; imports torch."""

from ..config import RefineConfig, RefineMethod
from .reconstruct import RefinedWeight, RefineResult, check_memory_before, refine_model

METHODS = RefineMethod.values()

__all__ = ["METHODS", "RefineConfig", "RefineResult", "RefinedWeight", "check_memory_before", "refine_model"]
