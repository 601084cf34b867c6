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
REFINE_METHODS = ("adaround", "brecq")
REFINE_CPU_ITERS = 500  # per layer/block; see README "Reconstruction" for the measurements
REFINE_GPU_ITERS = 2000


@dataclass(frozen=True)
class RefineConfig:
    """How to learn the rounding. ``iters=None``: by device (REFINE_GPU_ITERS on CUDA, REFINE_CPU_ITERS
    on CPU); ``drop_prob=None``: 0.5 for brecq (QDrop), 0 for adaround."""

    method: str = "brecq"
    iters: Optional[int] = None
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    batch_size: int = 32
    drop_prob: Optional[float] = None
    block_layers: int = 4
    scale_search: bool = True
    device: str = "auto"
    seed: int = 0
    quiet: bool = False

    def __post_init__(self):
        if self.method not in REFINE_METHODS:
            raise DataError(f"unknown refine method {self.method!r}; choose from {', '.join(REFINE_METHODS)}")
        if self.iters is not None and self.iters < 0:
            raise DataError("--refine-iters must not be negative")
        if self.lr <= 0 or self.reg_weight < 0 or self.batch_size < 1 or self.block_layers < 1:
            raise DataError("refine: lr must be positive, reg weight non-negative, batch size and block layers >= 1")
        if not 0 <= self.warmup < 1:
            raise DataError("refine: warmup is a fraction of the iterations in [0, 1)")
        if self.drop_prob is not None and not 0 <= self.drop_prob < 1:
            raise DataError("refine: drop probability must be in [0, 1)")

    @property
    def dropping(self) -> float:
        if self.drop_prob is not None:
            return self.drop_prob
        return 0.5 if self.method == "brecq" else 0.0

    def iterations(self, device) -> int:
        if self.iters is not None:
            return self.iters
        return REFINE_GPU_ITERS if device.type == "cuda" else REFINE_CPU_ITERS

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("quiet")
        data["drop_prob"] = self.dropping
        return data


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
    refine: Optional[str] = None  # adaround | brecq: learn the weight rounding (dsgonnx.refine)
    refine_options: dict = field(default_factory=dict)  # extra dsgonnx.refine.RefineConfig fields

    def __post_init__(self):
        resolve_bits(self.wbits, self.abits, self.target)  # raises for unsupported combinations
        if self.calibrator not in CALIBRATORS:
            raise DataError(f"unknown calibrator {self.calibrator!r}; choose from {', '.join(CALIBRATORS)}")
        if self.logits not in LOGITS_POLICIES:
            raise DataError(f"unknown logits policy {self.logits!r}; choose from {', '.join(LOGITS_POLICIES)}")
        if self.num_samples < 1:
            raise DataError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.refine is not None:
            known = set(RefineConfig.__dataclass_fields__) - {"method", "device", "seed", "quiet"}
            unknown = sorted(set(self.refine_options) - known)
            if unknown:
                raise DataError(f"unknown refine option {unknown[0]!r}; choose from {', '.join(sorted(known))}")
            RefineConfig(method=self.refine, **self.refine_options)  # raises DataError for bad values
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
