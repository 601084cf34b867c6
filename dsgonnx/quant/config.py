"""Settings of ``dsgonnx quantize`` (one frozen value, mirrored by the CLI flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import DataError
from ..preprocess import Preprocess
from .bits import resolve_bits
from .calibrate import CALIBRATORS
from .qdq import LOGITS_POLICIES

SYNTHETIC_SOURCES = ("dsg", "zeroq", "gaussian")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize to, calibrated on what, and how to check it.

    ``calib``: a synthesis method (``dsg``, ``zeroq``, ``gaussian``) or a path to real
    images (an image folder or an ``.npz`` with ``images``). ``synth`` holds extra
    :class:`~dsgonnx.synth.SynthConfig` fields (``lr``, ``slack_reading``...).
    """

    wbits: int = 8
    abits: int = 8
    calib: str = "dsg"
    num_samples: int = 64
    iters: int = 500
    iters_by_device: bool = False  # the CLI's default: pipeline.default_iters/default_low_res chose
    calibrator: str = "minmax"
    target: str = "cpu"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    logits: str = "exclude"
    reduce_range: Optional[bool] = None  # None: decided from the CPU for the cpu target
    seed: int = 0
    device: str = "auto"
    preprocess: Optional[Preprocess] = None
    input_shape: Optional[tuple[int, int, int, int]] = None
    output: Optional[str] = None
    force: bool = False
    validate: bool = True
    val_data: Optional[str] = None
    holdout: int = 16  # extra synthetic samples for validation without --val-data
    max_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    report: Optional[str] = None
    provider: str = "auto"
    quiet: bool = False
    synth: dict = field(default_factory=dict)

    def __post_init__(self):
        resolve_bits(self.wbits, self.abits, self.target)  # raises for unsupported combinations
        if self.calibrator not in CALIBRATORS:
            raise DataError(f"unknown calibrator {self.calibrator!r}; choose from {', '.join(CALIBRATORS)}")
        if self.logits not in LOGITS_POLICIES:
            raise DataError(f"unknown logits policy {self.logits!r}; choose from {', '.join(LOGITS_POLICIES)}")
        if self.num_samples < 1:
            raise DataError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.holdout < 0:
            raise DataError("--holdout must not be negative")

    @property
    def synthetic(self) -> bool:
        return self.calib in SYNTHETIC_SOURCES

    def to_dict(self) -> dict:
        data = asdict(self)
        data["preprocess"] = None if self.preprocess is None else self.preprocess.to_dict()
        data.pop("quiet")
        return data
