"""Reconstruction PTQ (AdaRound, BRECQ/QDrop) in the torch twin of the model; imports torch."""

from ..quant.config import REFINE_METHODS as METHODS
from ..quant.config import RefineConfig
from .reconstruct import RefinedWeight, RefineResult, refine_model

__all__ = ["METHODS", "RefineConfig", "RefineResult", "RefinedWeight", "refine_model"]
