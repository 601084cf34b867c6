"""Settings of a synthesis run (one frozen value, mirrored by the CLI flags)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..errors import DataError
from ..preprocess import Preprocess
from .margins import READINGS

METHODS = ("gaussian", "zeroq", "dsg")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_SLACK_READING = "layer-lower"


@dataclass(frozen=True)
class SynthConfig:
    """How to make calibration images.

    ``method``: ``gaussian`` (N(0,1) inputs, no optimisation), ``zeroq`` (per-sample BN
    matching + input prior) or ``dsg`` (slack alignment + layerwise enhancement + sample
    correlation inhibition; ``slack``/``lse``/``sci`` switch each part off for ablations).

    ``preprocess`` is the model's preprocessing recipe (only its mean, std and pixel scale
    matter here); when given, images are kept inside the box that real images occupy in
    the model's input space. Without it the input prior alone (per-channel mean 0, std 1)
    shapes the input range.
    """

    method: str = "dsg"
    num_samples: int = 64
    iters: int = 500
    lr: float = 0.1
    batch_size: Optional[int] = None  # None: all samples in one batch up to a memory-based cap
    seed: int = 0
    device: str = "auto"
    epsilon: float = 0.9
    slack_reading: str = DEFAULT_SLACK_READING
    slack: bool = True
    lse: bool = True
    sci: bool = True
    input_prior: bool = True
    ce_weight: float = 0.0  # cross-entropy to random labels (authors' code: 2)
    tv_weight: float = 0.0  # total-variation smoothness prior
    l2_weight: float = 0.0  # image L2 norm prior
    patience: int = 100  # ReduceLROnPlateau patience in iterations (ZeroQ: 100)
    low_res: Optional[int] = None  # resolution schedule: first optimise at low_res² pixels...
    low_res_share: float = 0.75  # ...for this share of the iterations, then at full size
    preprocess: Optional[Preprocess] = None
    amp: bool = False  # bfloat16 autocast on CUDA; statistics stay float32
    channels_last: Optional[bool] = None  # None: on for CPU
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise DataError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.device not in DEVICES:
            raise DataError(f"unknown device {self.device!r}; choose from {', '.join(DEVICES)}")
        if self.slack_reading not in READINGS:
            raise DataError(f"unknown slack reading {self.slack_reading!r}; choose from {', '.join(READINGS)}")
        if self.num_samples < 1:
            raise DataError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.iters < 0:
            raise DataError(f"--iters must be 0 or more, got {self.iters}")
        if not self.lr > 0:
            raise DataError(f"--lr must be positive, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise DataError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.epsilon < 1.0:
            raise DataError(f"--epsilon must be between 0 and 1, got {self.epsilon}")
        if self.low_res is not None and self.low_res < 8:
            raise DataError(f"--low-res must be at least 8 pixels, got {self.low_res}")
        if not 0.0 <= self.low_res_share < 1.0:
            raise DataError(f"--low-res-share must be in [0, 1), got {self.low_res_share}")
        for name in ("ce_weight", "tv_weight", "l2_weight"):
            if getattr(self, name) < 0:
                raise DataError(f"{name.replace('_', '-')} must not be negative")

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("quiet")
        data["preprocess"] = None if self.preprocess is None else self.preprocess.to_dict()
        return data
