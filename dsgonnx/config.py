"""Every setting of dsgonnx: typed, frozen, validated, and free of any stage.

This module imports neither torch, onnx nor onnxruntime, and none of dsgonnx's stages
(``graph``, ``synth``, ``quant``, ``refine``, ``validate``): the command line builds its
choices and defaults from it without loading them, and a test checks that it stays so.

Choices are ``str`` enums, so ``SynthConfig(method="dsg")`` and
``SynthConfig(method=SynthMethod.DSG)`` are the same value. Settings that depend on the
device (synthesis iterations, the low-resolution schedule, refinement iterations) are
``None`` by default and resolved in exactly one place, :func:`device_defaults`, by the
stage that knows the device — the Python API and the CLI therefore get the same defaults.

Errors name the parameters as written here, in backquotes (```num_samples```); the
command line turns them into its flags (``--num-samples``).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping, Optional, Union

from .errors import DataError
from .inputs import parse_input_shape
from .preprocess import Preprocess


class Choice(str, Enum):
    """A named choice that compares, prints and serialises as its string value."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value, param: str):
        """``value`` (a member or its string) as a member, or DataError naming ``param``."""
        try:
            return cls(str(value).lower() if isinstance(value, str) else value)
        except ValueError:
            raise DataError(f"unknown `{param}` {value!r}; choose from {', '.join(cls.values())}") from None


class SynthMethod(Choice):
    AUTO = "auto"  # dsg where the model carries BN statistics, else BN_FREE_DEFAULT
    GAUSSIAN = "gaussian"  # N(0,1) inputs, no optimisation
    ZEROQ = "zeroq"  # per-sample BN statistics matching + input prior
    DSG = "dsg"  # slack alignment + layerwise enhancement + sample correlation inhibition
    PROCEDURAL = "procedural"  # dead-leaves images in the pixel box; needs nothing from the model
    INVERSION = "inversion"  # procedural start, then cross-entropy + image priors + SCI; needs no BN

    @property
    def needs_bn(self) -> bool:
        return self in (SynthMethod.ZEROQ, SynthMethod.DSG)

    @property
    def drawn(self) -> bool:
        """Images drawn once, never optimised (and needing no preprocessing to stay in range)."""
        return self in (SynthMethod.GAUSSIAN, SynthMethod.PROCEDURAL)


# What ``auto`` synthesizes for a model without BN statistics (folded or BN-free), chosen by
# measurement on folded twins of three benchmark models (benchmarks/RESULTS.md, "BN folded").
BN_FREE_DEFAULT = SynthMethod.PROCEDURAL
# The settings left unset (None) take their method's value: inversion's own below, every other
# method's in METHOD_DEFAULTS. Inversion's were measured on folded ResNet-20 (README, "BN-folded
# models"): without the anchor, or at lr 0.1, it drifts away from its procedural start and
# loses 5-12 points at W4A4.
METHOD_DEFAULTS = MappingProxyType({"lr": 0.1, "ce_weight": 0.0, "tv_weight": 0.0, "l2_weight": 0.0,
                                    "anchor_weight": 0.0, "jitter": False})
INVERSION_WEIGHTS = MappingProxyType({"lr": 0.01, "ce_weight": 1.0, "tv_weight": 0.5, "l2_weight": 0.0,
                                      "anchor_weight": 10.0, "jitter": True})


class Device(Choice):
    AUTO = "auto"  # CUDA when torch sees a usable GPU, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


class SlackReading(Choice):
    """Readings of the DSG margins (see :mod:`dsgonnx.synth.margins`)."""

    LAYER_UPPER = "layer-upper"
    LAYER_LOWER = "layer-lower"
    SAMPLE_UPPER = "sample-upper"
    SAMPLE_LOWER = "sample-lower"
    CHANNEL_UPPER = "channel-upper"
    CHANNEL_LOWER = "channel-lower"


class Alignment(Choice):
    """Which BN statistics zeroq/dsg hold to the running ones."""

    SAMPLE = "sample"  # each sample's own (ZeroQ, DSG): every sample pulled to the population's statistics
    BATCH = "batch"  # the batch's pooled statistics (DeepInversion, GDFQ): each sample free, the set matched


class SynthStart(Choice):
    """What zeroq/dsg optimise from (procedural and inversion always start from dead leaves)."""

    GAUSSIAN = "gaussian"  # N(0, 1) pixels (ZeroQ, DSG): every sample starts with the same statistics
    PROCEDURAL = "procedural"  # dead-leaves images, each with its own colours, contrast and scales


class Calibrator(Choice):
    # mse for activations of 4 bits or fewer, else minmax (measured: W4A4 on four models, README)
    AUTO = "auto"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"  # least expected squared error on ORT's histograms


class Target(Choice):
    CPU = "cpu"  # uint8 activations, int8 per-channel weights
    GPU = "gpu"  # symmetric int8 (and 4/16/simulated bits)
    TRT = "trt"  # symmetric int8 only


class LogitsPolicy(Choice):
    EXCLUDE = "exclude"  # the whole classifier layer stays float (default, measured)
    FLOAT = "float"  # its weights and input are quantized, the logits are not
    QUANTIZE = "quantize"


class BiasCorrection(Choice):
    """Where bias correction takes E[x] of each layer's input (:mod:`dsgonnx.quant.correct`)."""

    AUTO = "auto"  # analytic where BN statistics reach the layer (the model input: the first BN's), empirical elsewhere
    ANALYTIC = "analytic"  # from the BN statistics only (no data); other layers uncorrected
    EMPIRICAL = "empirical"  # per-channel means over the calibration images
    OFF = "off"


class PoolRange(Choice):
    """The range an averaging pool's output (GlobalAveragePool, AveragePool, ReduceMean) is quantized on."""

    INPUT = "input"  # its input's calibrated range: a mean never leaves it (TFLite's rule for AVERAGE_POOL_2D)
    CALIBRATED = "calibrated"  # its own calibrated range (ORT's default)


class Rounding(Choice):
    """How weights are rounded to their grid without data (``--refine``/``--qat`` learn it instead)."""

    AUTO = "auto"  # squant for weights of 4 bits or fewer (measured: W4A4 on five models), else nearest
    NEAREST = "nearest"  # ORT's: each weight to its nearest integer
    SQUANT = "squant"  # SQuant's flips: each kernel's and output channel's summed error within ±0.5 (dsgonnx.quant.rounding)


class RefineMethod(Choice):
    ADAROUND = "adaround"  # layer by layer
    BRECQ = "brecq"  # blocks between residual joins, with QDrop


class Provider(Choice):
    AUTO = "auto"  # CUDA when a session really runs on it, else the CPU
    CUDA = "cuda"
    CPU = "cpu"


SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
NATIVE_BITS = (4, 8, 16)  # ORT has integer types for these; the others are simulated
DEFAULT_SLACK_READING = SlackReading.LAYER_LOWER
DEFAULT_EPSILON = 0.9  # DSG's slack percentile


# --- device-dependent defaults: the one place -------------------------------------------

@dataclass(frozen=True)
class DeviceDefaults:
    """What ``None`` means for the device-dependent settings.

    CPU: 100 synthesis iterations, the first 75 at 128 px for inputs of 160 px and more (a
    224-px EfficientNet-Lite0 iteration costs ~8x a 128-px one on 2 cores; README "CPU
    defaults"); 500 refinement iterations per unit (README "Reconstruction"). CUDA: the
    papers' 500 full-size synthesis iterations and 2000 refinement iterations.
    """

    synth_iters: int
    low_res: Optional[int]  # applies to inputs of at least LOW_RES_FROM pixels
    refine_iters: int
    qat_iters: int


LOW_RES_FROM = 160
_DEFAULTS = {
    "cpu": DeviceDefaults(synth_iters=100, low_res=128, refine_iters=500, qat_iters=2000),
    "cuda": DeviceDefaults(synth_iters=500, low_res=None, refine_iters=2000, qat_iters=10000),
}


def device_defaults(device_type: str) -> DeviceDefaults:
    """The defaults for a resolved torch device type (``"cpu"`` or ``"cuda"``)."""
    return _DEFAULTS["cuda" if device_type == "cuda" else "cpu"]


# --- validation helpers --------------------------------------------------------------------

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DataError(message)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


SEED_MAX = 2**32 - 1  # numpy's legacy seeding's bound; torch's generators take it with room for the offsets added


def _check_seed(value) -> None:
    _require(_is_int(value) and 0 <= value <= SEED_MAX, f"`seed` must be an integer from 0 to {SEED_MAX}, got {value}")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value):
    """JSON-ready form of a config field value."""
    if isinstance(value, Choice):
        return value.value
    if isinstance(value, Preprocess):
        return value.to_dict()
    if isinstance(value, (SynthOptions, RefineConfig)):
        return value.to_dict()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _to_dict(config) -> dict:
    return {f.name: _plain(getattr(config, f.name)) for f in fields(config)}


def check_bits(wbits: int, abits: int, target) -> None:
    """Reject bit widths dsgonnx cannot produce on ``target`` (DataError)."""
    target = Target.parse(target, "target")
    for name, what, bits in (("wbits", "weight", wbits), ("abits", "activation", abits)):
        _require(_is_int(bits) and bits in SUPPORTED_BITS,
                 f"unsupported {what} bit width {bits!r} (`{name}`); dsgonnx supports "
                 f"{', '.join(map(str, SUPPORTED_BITS))}")
        _require(target != Target.TRT or bits == 8,
                 f"target trt (TensorRT) runs symmetric int8 only; {what} bits {bits} (`{name}`) cannot run there")


def check_thresholds(max_drop, min_agreement) -> None:
    """The accuracy gate's thresholds, when given, must be evaluable."""
    _require(max_drop is None or (_is_number(max_drop) and max_drop >= 0),
             f"`max_drop` must be a number of percentage points >= 0, got {max_drop!r}")
    _require(min_agreement is None or (_is_number(min_agreement) and 0 <= min_agreement <= 1),
             f"`min_agreement` must be a fraction between 0 and 1, got {min_agreement!r}")


# --- synthesis -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthOptions:
    """How a synthesis method runs (the knobs beyond method, count, iterations and seed).

    ``low_res``: optimise at ``low_res``² pixels for ``low_res_share`` of the iterations,
    then at full size; ``None`` = the device's default (:func:`device_defaults`, only when
    ``iters`` is by device too), ``0`` = never.
    """

    lr: Optional[float] = None  # Adam's learning rate; None: by method (0.1; inversion 0.01)
    batch_size: Optional[int] = None  # None: all samples in one batch up to a memory-based cap
    # DSG's slack margins: the percentile and how it is read; they act where its per-sample
    # alignment runs with ``slack`` on (and in QAT's generator with DSG's loss)
    epsilon: float = DEFAULT_EPSILON
    slack_reading: SlackReading = DEFAULT_SLACK_READING
    slack: bool = True
    lse: bool = True
    sci: bool = True
    input_prior: bool = True
    ce_weight: Optional[float] = None  # cross-entropy to random labels (authors' code: 2); None: by method
    tv_weight: Optional[float] = None  # total-variation smoothness prior; None: by method
    l2_weight: Optional[float] = None  # image L2 norm prior; None: by method
    # inversion: every Conv output's per-sample channel statistics held to those its procedural
    # start images have (ZeroQ's alignment with the start as the target); None: by method
    anchor_weight: Optional[float] = None
    # each step's forward on a randomly shifted (up to 1/8 of the side, wrapped) and mirrored
    # copy of the batch (DeepInversion's jitter); None: by method (inversion on, others off)
    jitter: Optional[bool] = None
    # zeroq/dsg: each BN gap in units of that channel's running std (every layer on one scale),
    # instead of the papers' absolute gaps, where layers with large activations dominate the loss
    normalize_gaps: bool = False
    # None: by use: batch where the images train QAT or reconstruction (``QuantConfig.synth_config``;
    # measured, README "What the DSG images lack for QAT" and "Which alignment reconstruction
    # learns from"), else sample (the papers')
    alignment: Optional[Alignment] = None
    # zeroq/dsg: the images optimisation starts from (slack margins are read on a Gaussian batch
    # either way, as the papers define them); None: by use: procedural where reconstruction
    # learns from the images of a model with depthwise convolutions (``QuantConfig.synth_config``;
    # measured, README "Where reconstruction's synthetic images start"), else gaussian (the papers')
    start: Optional[SynthStart] = None
    # zeroq/dsg: each batch's images are a fresh generator's output G(z), the generator and one
    # latent per image learned by the method's losses (Genie's parameterisation; synth/latent.py)
    # instead of the pixels themselves
    generator: bool = False
    # every strided Conv sees its input shifted by up to one pixel each step, reflected at the
    # border (Genie's swing convolution: the stride's sampling grid never fixed on the image)
    swing: bool = False
    # zeroq/dsg: more models that take the same images (same size and preprocessing), run beside
    # this one each step: the images match every model's BN statistics at once, the loss averaged
    # over the models (MixMix's feature mixing; graph/merge.py)
    mix_models: tuple = ()
    patience: int = 100  # ReduceLROnPlateau patience in iterations (ZeroQ: 100)
    low_res: Optional[int] = None
    low_res_share: float = 0.75
    amp: bool = False  # bfloat16 autocast on CUDA; statistics stay float32
    channels_last: Optional[bool] = None  # None: on for CPU

    def __post_init__(self):
        object.__setattr__(self, "slack_reading", SlackReading.parse(self.slack_reading, "slack_reading"))
        if self.alignment is not None:
            object.__setattr__(self, "alignment", Alignment.parse(self.alignment, "alignment"))
        if self.start is not None:
            object.__setattr__(self, "start", SynthStart.parse(self.start, "start"))
        _require(self.lr is None or (_is_number(self.lr) and self.lr > 0), f"`lr` must be positive, got {self.lr}")
        _require(self.batch_size is None or (_is_int(self.batch_size) and self.batch_size >= 1),
                 f"`batch_size` must be at least 1, got {self.batch_size}")
        _require(_is_number(self.epsilon) and 0.0 < self.epsilon < 1.0,
                 f"`epsilon` must be between 0 and 1, got {self.epsilon}")
        _require(self.low_res is None or (_is_int(self.low_res) and (self.low_res == 0 or self.low_res >= 8)),
                 f"`low_res` must be 0 (off) or at least 8 pixels, got {self.low_res}")
        _require(_is_number(self.low_res_share) and 0.0 <= self.low_res_share < 1.0,
                 f"`low_res_share` must be in [0, 1), got {self.low_res_share}")
        _require(_is_int(self.patience) and self.patience >= 1, f"`patience` must be at least 1, got {self.patience}")
        for name in ("ce_weight", "tv_weight", "l2_weight", "anchor_weight"):
            value = getattr(self, name)
            _require(value is None or (_is_number(value) and value >= 0), f"`{name}` must not be negative")
        _require(self.jitter is None or isinstance(self.jitter, bool),
                 f"`jitter` must be true or false, got {self.jitter!r}")
        for name in ("generator", "swing"):
            _require(isinstance(getattr(self, name), bool), f"`{name}` must be true or false, got {getattr(self, name)!r}")
        _require(not isinstance(self.mix_models, (str, bytes)) and all(isinstance(m, (str, os.PathLike))
                                                                       for m in self.mix_models),
                 f"`mix_models` must be a list of model paths, got {self.mix_models!r}")
        object.__setattr__(self, "mix_models", tuple(str(m) for m in self.mix_models))
        _require(not (self.generator and self.start == SynthStart.PROCEDURAL),
                 "`generator` makes the images from latent vectors; `start` procedural has no meaning with it")

    def margin_settings(self) -> list[str]:
        """The slack margins' settings given other values than their defaults."""
        return [name for name, default in (("epsilon", DEFAULT_EPSILON), ("slack_reading", DEFAULT_SLACK_READING))
                if getattr(self, name) != default]

    def without_margin_settings(self) -> "SynthOptions":
        return replace(self, epsilon=DEFAULT_EPSILON, slack_reading=DEFAULT_SLACK_READING)

    def given(self) -> list[str]:
        """The options given other values than their defaults."""
        return [f.name for f in fields(SynthOptions) if getattr(self, f.name) != getattr(_NO_OPTIONS, f.name)]

    def unread(self, method: "SynthMethod") -> tuple[list[str], str]:
        """The options given other values than their defaults that a synthesis by ``method``
        does not read, and why (the ones with reasons of their own — slack margins, ``lse``,
        ``sci``, ``generator``, ``swing``, ``start`` — are refused by :meth:`SynthConfig.for_model`)."""
        if method.drawn:
            names, why = _OPTIMISATION, "its images are drawn once, not optimised"
        elif method == SynthMethod.INVERSION:
            names, why = ("alignment", "normalize_gaps", "mix_models"), "it matches no BN statistics"
        else:
            names, why = ("anchor_weight",), "the anchor holds inversion's images to their procedural starts"
        given = self.given()
        return [name for name in names if name in given], why

    def has_margins(self, method: "SynthMethod", alignment: "Alignment") -> bool:
        """Whether a synthesis by ``method`` with ``alignment`` places DSG's slack margins: DSG's
        per-sample alignment with ``slack`` on."""
        return method == SynthMethod.DSG and alignment == Alignment.SAMPLE and self.slack

    def to_dict(self) -> dict:
        return _to_dict(self)


_NO_OPTIONS = SynthOptions()
# what only a synthesis that optimises its images reads (gaussian and procedural images are drawn)
_OPTIMISATION = ("lr", "ce_weight", "tv_weight", "l2_weight", "anchor_weight", "jitter", "normalize_gaps", "alignment",
                 "input_prior", "low_res", "low_res_share", "patience", "amp", "mix_models")


@dataclass(frozen=True)
class SynthConfig(SynthOptions):
    """How to make calibration images (``dsgonnx.synthesize``, ``dsgonnx synthesize``).

    ``method``: ``auto`` (``dsg`` where the model carries BN statistics, else
    :data:`BN_FREE_DEFAULT`), ``gaussian`` (N(0,1) inputs, no optimisation), ``zeroq``
    (per-sample BN matching + input prior), ``dsg`` (slack alignment + layerwise enhancement +
    sample correlation inhibition; ``slack``/``lse``/``sci`` switch each part off for
    ablations), ``procedural`` (dead-leaves images, nothing from the model) or ``inversion``
    (from procedural images: cross-entropy to random classes, total variation, jitter and
    SCI; no BN statistics needed). ``iters=None``: by device (:func:`device_defaults`).

    ``preprocess`` is the model's preprocessing recipe (only its mean, std and pixel scale
    matter here); when given, images are kept inside the box that real images occupy in
    the model's input space. Without it the input prior alone (per-channel mean 0, std 1)
    shapes the input range.
    """

    method: SynthMethod = SynthMethod.AUTO
    num_samples: int = 64
    iters: Optional[int] = None
    seed: int = 0
    device: Device = Device.AUTO
    preprocess: Optional[Preprocess] = None

    def __post_init__(self):
        super().__post_init__()
        if self.start is None:  # a synthesis run on its own starts where the papers do
            object.__setattr__(self, "start", SynthStart.GAUSSIAN)
        object.__setattr__(self, "method", SynthMethod.parse(self.method, "method"))
        object.__setattr__(self, "device", Device.parse(self.device, "device"))
        _require(_is_int(self.num_samples) and self.num_samples >= 1,
                 f"`num_samples` must be at least 1, got {self.num_samples}")
        _require(self.iters is None or (_is_int(self.iters) and self.iters >= 0),
                 f"`iters` must be 0 or more, got {self.iters}")
        _check_seed(self.seed)

    @classmethod
    def from_options(cls, options: SynthOptions, **run) -> "SynthConfig":
        return cls(**{f.name: getattr(options, f.name) for f in fields(SynthOptions)}, **run)

    def unread(self, method: "SynthMethod") -> tuple[list[str], str]:
        names, why = super().unread(method)
        return names + (["iters"] if method.drawn and self.iters else []), why

    def for_model(self, has_bn: bool, drop_unread: bool = False) -> tuple["SynthConfig", Optional[str]]:
        """This config with ``auto`` decided for a model with (or without) BN statistics and
        the loss weights left unset filled in by method; and why, when ``auto`` decided.

        An option the method does not read (:meth:`unread`) is refused where the method was
        given; where ``auto`` decided it (``auto``'s reason then says so), or with ``drop_unread``
        (``quantize``, whose other readers of the options — the inversion probe, QAT's generator
        — decide what it refuses or says), it is set back to its default."""
        method, why = self.method, None
        if method == SynthMethod.AUTO:
            method = SynthMethod.DSG if has_bn else BN_FREE_DEFAULT
            why = ("the model carries BN statistics" if has_bn else
                   f"the model carries no BN statistics, and {BN_FREE_DEFAULT} was the best BN-free source "
                   "measured on folded models (benchmarks/RESULTS.md, BN folded)")
        _require(not (method == SynthMethod.GAUSSIAN and self.start == SynthStart.PROCEDURAL),
                 "`start` procedural has no meaning for `method` gaussian (its images are drawn, not optimised); "
                 "use `method` procedural")
        _require(not (self.swing and method.drawn),
                 f"`swing` shifts what the model sees while images are optimised; `method` {method} draws them")
        _require(not self.generator or method.needs_bn,
                 f"`generator` is for the BN-matching methods ({SynthMethod.ZEROQ}, {SynthMethod.DSG}); "
                 f"`method` is {method}" + (f" ({why})" if why else ""))
        unread, because = self.unread(method)
        if unread:
            named = f"{' and '.join(f'`{name}`' for name in unread)} {'changes' if len(unread) == 1 else 'change'} nothing"
            # given for whatever `auto` would decide (one command for many models): said, not refused
            _require(drop_unread or why is not None, f"{named} for `method` {method}: {because}")
            if why is not None and not drop_unread:
                why += f"; {named} for it ({because})"
            self = replace(self, **{name: None if name == "iters" else getattr(_NO_OPTIONS, name) for name in unread})
        alignment = self.alignment or Alignment.SAMPLE
        # the ablations switch off a term this run has: slack margins and layerwise enhancement
        # weigh DSG's per-sample terms (batch alignment has one pooled term per layer); SCI is
        # DSG's and inversion's
        per_sample = method == SynthMethod.DSG and alignment == Alignment.SAMPLE
        inert = [f"`{name}`" for name, acts in (("slack", per_sample), ("lse", per_sample),
                                                ("sci", method in (SynthMethod.DSG, SynthMethod.INVERSION)))
                 if not getattr(self, name) and not acts]
        _require(not inert, f"{' and '.join(inert)} {'changes' if len(inert) == 1 else 'change'} nothing for `method` "
                            f"{method} with `alignment` {alignment}: DSG's slack margins and layerwise enhancement act "
                            "on its per-sample alignment alone, and sample correlation inhibition on dsg and inversion"
                            + (f" ({why})" if why else ""))
        tuned = self.margin_settings()
        _require(not tuned or self.has_margins(method, alignment),
                 f"{' and '.join(f'`{name}`' for name in tuned)} {'tunes' if len(tuned) == 1 else 'tune'} DSG's slack "
                 "margins, " + ("and `slack` has switched them off" if per_sample else
                               f"which `method` {method} with `alignment` {alignment} does not have: they weigh DSG's "
                               "per-sample alignment alone") + (f" ({why})" if why else ""))
        own = INVERSION_WEIGHTS if method == SynthMethod.INVERSION else METHOD_DEFAULTS
        unset = {name: own[name] for name in own if getattr(self, name) is None}
        return replace(self, method=method, alignment=alignment, **unset), why

    def for_device(self, device_type: str, input_size: int) -> "SynthConfig":
        """This config with ``iters`` and ``low_res`` resolved for the device and input size (the
        smaller side, ``input_size``)."""
        _require(not self.low_res or self.low_res < input_size,
                 f"`low_res` {self.low_res} is not below the input's {input_size} px, so there would be no "
                 "low-resolution phase: give a smaller size, or 0 for none")
        if self.iters is not None:
            return replace(self, low_res=self.low_res or None)
        defaults = device_defaults(device_type)
        low_res = self.low_res
        if low_res is None:
            low_res = defaults.low_res if input_size >= LOW_RES_FROM else None
        return replace(self, iters=defaults.synth_iters, low_res=low_res or None)


# --- reconstruction ---------------------------------------------------------------------------

REFINE_STARTS = ("auto", "nearest", "squant")
# the rate at which reconstruction learns the weight steps with real calibration images (measured:
# README, "Learned weight steps")
WEIGHT_STEP_LR = 1e-3
INSIDE_MEANS = ("auto", "written", "calibration")


@dataclass(frozen=True)
class RefineConfig:
    """How to learn the weight rounding (``QuantConfig.refine``).

    ``iters=None``: by device (:func:`device_defaults`); ``drop_prob=None``: 0.5 for brecq
    (QDrop), 0 for adaround. ``act_lr`` > 0 learns the activation step sizes with the rounding
    (LSQ; Adam on the log of each step, so the rate is relative); 0 keeps the calibrated ones.
    ``weight_step_lr`` > 0 learns each layer's weight steps with its rounding (Genie-M, Jeon et
    al. 2023: the floors stay on the starting grid, the step scales them; Adam on its log), and
    the learned steps are the exported scales; 0 keeps the clipping-searched ones; None (the
    default): :data:`WEIGHT_STEP_LR` with real calibration images, 0 with synthetic ones
    (:meth:`resolved`; measured in README, 'Learned weight steps').
    ``start``: the rounding each unit's learning starts from — ``nearest`` (AdaRound's: every
    soft bit at the weight's fractional part), ``squant`` (SQuant's rounding on the unit's own
    grid: the elements it rounds the other way start mirrored about ½), or ``auto`` (the
    default): the rounding quantize writes without ``refine``
    (:meth:`QuantConfig.plain_rounding`: SQuant's at 4 bits or fewer, else nearest), as QAT's
    ``auto``. ``views``: each calibration image enters reconstruction as that many views, itself
    and ``views`` − 1 flipped and shifted copies (as QAT's, drawn once from the run's seed).
    ``input_drop``: while a unit learns, each element of its inputs comes from the float
    model's stream with this probability, else from the quantized prefix's (QDrop's mixing of
    a block's input, Wei et al. 2022, beside ``drop_prob`` inside the block); ``None`` (the
    default): ``drop_prob``'s value, as QDrop draws both with one probability (0.5 for brecq,
    0 for adaround; measured in README, 'QDrop's input mixing'); 0 trains on the quantized
    prefix's alone. Both probabilities are drawn to the nearest 1/256
    (:func:`dsgonnx.refine.quantizers.random_mask`). ``correct_inside``: each refined layer's
    bias is simulated as bias correction will write it, b − ΔW·E[x] (``QuantConfig.bias_correction``'s
    means, ΔW following the soft rounding while it learns), so reconstruction learns the
    rounding of the corrected model and each block learns on the corrected blocks before it;
    False: the correction is applied to the written model only, after reconstruction learned
    without it; None (the default): True wherever quantize corrects biases (not with
    ``bias_correction`` off, nor in the reconstruction QAT starts from) — measured in README,
    'Bias correction inside the reconstruction'. :func:`refine_model` needs it resolved
    (:meth:`resolved`). ``inside_means``: the E[x] of the simulated correction — ``written``
    (those of the correction written: from the BN statistics where they reach a layer),
    ``calibration`` (every layer's input mean over the calibration images: the loss then holds
    no shift the calibration images' own means would cause, and the file is corrected with
    the written means), ``auto`` (the default): ``calibration`` with synthetic calibration
    images on a network with depthwise convolutions, ``written`` with real ones and with
    synthetic ones elsewhere (measured: README, 'Bias correction inside the reconstruction').
    ``prediction_weight`` > 0 adds PD-Quant's prediction difference to each unit's loss (Liu
    et al. 2023): that weight times KL(softmax(z_fp / T) ‖ softmax(z / T)), z the model's
    output with the unit's quantized output run through the rest of the network in float
    (the quantized prefix's values wherever the rest reads earlier tensors), z_fp the float
    model's, T ``prediction_temperature``; 0 (the default): the block's squared error alone.
    PD-Quant's code uses weight 10 (its λ_r = 0.1) and T = 4 (1 for MobileNetV2).
    Measured on the benchmark's W4A4 rows (README, 'Where reconstruction starts'):
    SQuant's start is ahead or level on EfficientNet-Lite0 with every source (+6.55 with real
    images, level with DSG's, +2.78 BN-folded), level on MobileNet v1 0.75, within
    0.34 on the ResNets but for ResNet-20 with DSG images (−1.41; +0.77 BN-folded ResNet-20).
    :func:`refine_model` needs it resolved (``nearest`` or ``squant``); quantize resolves ``auto``
    (:meth:`resolved`).
    """

    STARTS: ClassVar[tuple] = REFINE_STARTS  # the values each field accepts (the CLI's choices)
    INSIDE_MEANS: ClassVar[tuple] = INSIDE_MEANS

    method: RefineMethod = RefineMethod.BRECQ
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
    act_lr: float = 0.0
    weight_step_lr: Optional[float] = None
    start: str = "auto"
    views: int = 1
    input_drop: Optional[float] = None
    correct_inside: Optional[bool] = None
    inside_means: str = "auto"
    prediction_weight: float = 0.0
    prediction_temperature: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "method", RefineMethod.parse(self.method, "refine"))
        _require(_is_number(self.prediction_weight) and self.prediction_weight >= 0,
                 f"`refine.prediction_weight` (weight of the prediction difference) must not be negative, "
                 f"got {self.prediction_weight}")
        _require(_is_number(self.prediction_temperature) and self.prediction_temperature > 0,
                 f"`refine.prediction_temperature` must be positive, got {self.prediction_temperature}")
        _require(self.correct_inside is None or isinstance(self.correct_inside, bool),
                 f"`refine.correct_inside` must be true or false, got {self.correct_inside!r}")
        _require(self.inside_means in INSIDE_MEANS,
                 f"`refine.inside_means` must be one of {', '.join(INSIDE_MEANS)}, got {self.inside_means!r}")
        _require(self.input_drop is None or (_is_number(self.input_drop) and 0 <= self.input_drop < 1),
                 f"`refine.input_drop` (probability of a unit input's element being the float model's) must be in "
                 f"[0, 1), got {self.input_drop}")
        _require(_is_int(self.views) and self.views >= 1,
                 f"`refine.views` (views of each calibration image) must be at least 1, got {self.views}")
        _require(self.start in REFINE_STARTS,
                 f"`refine.start` must be one of {', '.join(REFINE_STARTS)}, got {self.start!r}")
        _require(_is_number(self.act_lr) and 0 <= self.act_lr < 1,
                 f"`refine.act_lr` (activation step learning rate) must be in [0, 1), got {self.act_lr}")
        _require(self.weight_step_lr is None or (_is_number(self.weight_step_lr) and 0 <= self.weight_step_lr < 1),
                 f"`refine.weight_step_lr` (weight step learning rate) must be in [0, 1), got {self.weight_step_lr}")
        _require(self.iters is None or (_is_int(self.iters) and self.iters >= 0),
                 f"`refine.iters` must not be negative, got {self.iters}")
        _require(_is_number(self.lr) and self.lr > 0, f"`refine.lr` must be positive, got {self.lr}")
        _require(_is_number(self.reg_weight) and self.reg_weight >= 0,
                 f"`refine.reg_weight` must not be negative, got {self.reg_weight}")
        _require(_is_int(self.batch_size) and self.batch_size >= 1,
                 f"`refine.batch_size` must be at least 1, got {self.batch_size}")
        _require(_is_int(self.block_layers) and self.block_layers >= 1,
                 f"`refine.block_layers` must be at least 1, got {self.block_layers}")
        _require(_is_number(self.warmup) and 0 <= self.warmup < 1,
                 f"`refine.warmup` is a fraction of the iterations in [0, 1), got {self.warmup}")
        _require(self.drop_prob is None or (_is_number(self.drop_prob) and 0 <= self.drop_prob < 1),
                 f"refine drop probability `refine.drop_prob` must be in [0, 1), got {self.drop_prob}")

    @property
    def dropping(self) -> float:
        if self.drop_prob is not None:
            return self.drop_prob
        return 0.5 if self.method == RefineMethod.BRECQ else 0.0

    @property
    def input_dropping(self) -> float:
        return self.input_drop if self.input_drop is not None else self.dropping

    def for_device(self, device_type: str) -> "RefineConfig":
        """This config with ``iters``, ``drop_prob`` and ``input_drop`` resolved."""
        iters = self.iters if self.iters is not None else device_defaults(device_type).refine_iters
        return replace(self, iters=iters, drop_prob=self.dropping, input_drop=self.input_dropping)

    def resolved(self, plain: "Rounding", corrected: bool = False, synthetic: bool = False,
                 depthwise: bool = False) -> "RefineConfig":
        """This config with ``start`` ``auto`` made the rounding ``plain`` (what quantize writes
        without reconstruction, :meth:`QuantConfig.plain_rounding`), ``correct_inside`` None
        made ``corrected`` (whether quantize corrects the biases of the model reconstructed),
        ``inside_means`` ``auto`` made ``calibration`` for ``synthetic`` calibration images of a
        network with ``depthwise`` convolutions, else ``written``, and ``weight_step_lr`` None
        made 0 for ``synthetic`` images, else :data:`WEIGHT_STEP_LR`."""
        start = _start_from(plain) if self.start == "auto" else self.start
        inside = corrected if self.correct_inside is None else self.correct_inside
        means = (self.inside_means if self.inside_means != "auto" else
                 "calibration" if synthetic and depthwise else "written")
        steps = self.weight_step_lr if self.weight_step_lr is not None else 0.0 if synthetic else WEIGHT_STEP_LR
        return replace(self, start=start, correct_inside=inside, inside_means=means, weight_step_lr=steps)

    def to_dict(self) -> dict:
        return _to_dict(self) | {"drop_prob": self.dropping, "input_drop": self.input_dropping}


def _start_from(plain: "Rounding") -> str:
    """The ``start`` that ``auto`` means for reconstruction and QAT: the integers of the rounding
    ``plain`` that quantize writes without them."""
    return "squant" if plain == Rounding.SQUANT else "nearest"


QAT_DATA = ("auto", "generator", "calib", "mixed")
GENERATOR_LOSSES = ("dsg", "bns")
QAT_OPTIMIZERS = ("adam", "sgd")
QAT_LOSSES = ("mse", "kl")
QAT_STARTS = ("auto", "nearest", "squant", "refine")
QAT_MIXES = ("none", "mixup", "cutmix")
# QAT's feature distillation weight by default on networks without depthwise convolutions
# (README, 'Distilling every layer'); 0 on networks with them
AUTO_FEATURE_WEIGHT = 100.0


@dataclass(frozen=True)
class QatConfig:
    """Quantization-aware training by distillation from the float model (``QuantConfig.qat``).

    ``iters=None``: by device (:func:`device_defaults`). ``lr``: Adam's rate for the float
    weights and biases (cosine to 0 over the run); ``weight_step_lr``/``act_lr``: for the
    logs of the weight and activation steps (LSQ; 0 keeps the calibrated ones).
    ``time_budget``: seconds of training after which it stops and what it has learned is exported
    (with ``checkpoint``, the state is saved then, so that ``resume`` continues it).
    ``checkpoint``: a file the run's state is written to every ``checkpoint_every`` steps;
    with ``resume`` a run starts from it.
    ``data``: what each step trains on — ``generator`` (fresh images from a conditional
    generator trained alongside against the float model's BN statistics, GDFQ-style; needs a
    model with BN statistics), ``calib`` (the calibration images, augmented when ``augment``),
    ``mixed`` (half of each batch from each), or ``auto`` (the calibration images: on
    ResNet-20/56 W4A4 the fixed DSG set beat the generator, see README). ``generator_loss``: ``dsg`` (slack
    alignment, layerwise enhancement, sample correlation inhibition) or ``bns`` (GDFQ's batch
    statistics); None follows the calibration method (``zeroq`` → ``bns``, else ``dsg``).
    ``generator_warmup``: generator steps before the model trains (GDFQ warms up too);
    ``bn_weight``: the BN term against the cross-entropy in the generator's loss.
    ``optimizer``: for the weights and biases, ``adam`` or ``sgd`` (Nesterov momentum 0.9, the
    data-free QAT papers'); the steps are on Adam either way.
    ``loss``: what the student minimises against the float model's logits — ``mse`` (their
    mean squared difference) or ``kl`` (T²·KL of the softened logits at ``temperature``, the
    papers' distillation, which a 4-bit student lowers by flattening its logits: see README).
    ``start``: the weight integers training starts from, on the student's own grid — ``nearest``
    (plain rounding), ``squant`` (SQuant's data-free flips of it, :mod:`dsgonnx.quant.rounding`),
    either way with bias correction, ``refine``: the reconstruction's result (its learned
    integers, weight steps and any learned activation steps, bias-corrected the same way;
    reconstruction runs first, with ``QuantConfig.refine``'s settings, else brecq's defaults),
    or ``auto``: the rounding quantize writes without QAT
    (:meth:`QuantConfig.plain_rounding`: SQuant's at 4 bits or fewer, else nearest).
    ``mix``: with probability ½ each calibration image of a batch is blended with another of
    the batch after augmentation — ``mixup`` (a weighted sum, weight uniform in [0, 1]) or
    ``cutmix`` (a box of the other, its area uniform in [0, 1]) — so a fixed set shows the
    student images between its samples; the teacher labels each blend. ``none`` trains on the
    views alone. ``feature_weight``: adds that weight times the mean, over the trained layers, of
    each layer output's squared difference from the float model's relative to the float output's
    mean square (feature distillation: every image constrains every layer, not ten logits); 0
    distils the logits alone; None (the default): :data:`AUTO_FEATURE_WEIGHT` on a network
    without depthwise convolutions, 0 on one with them (W4A4, 100 batch-aligned DSG images:
    ResNet-56 80.93 against 79.67, ResNet-20 78.87 against 78.95 with the logits 0.76 dB closer
    to FP32's; MobileNet v1 0.75 50.33 against 50.56, no gain; README, 'Distilling every layer').
    """

    DATA: ClassVar[tuple] = QAT_DATA  # the values each field accepts (the CLI's choices)
    GENERATOR_LOSSES: ClassVar[tuple] = GENERATOR_LOSSES
    OPTIMIZERS: ClassVar[tuple] = QAT_OPTIMIZERS
    LOSSES: ClassVar[tuple] = QAT_LOSSES
    STARTS: ClassVar[tuple] = QAT_STARTS
    MIXES: ClassVar[tuple] = QAT_MIXES

    iters: Optional[int] = None
    lr: float = 1e-4
    weight_step_lr: float = 1e-3
    act_lr: float = 1e-4
    batch_size: int = 64
    temperature: float = 1.0
    augment: bool = True
    time_budget: Optional[float] = None
    checkpoint: Optional[str] = None
    checkpoint_every: int = 200
    resume: bool = False
    data: str = "auto"
    generator_loss: Optional[str] = None
    generator_lr: float = 1e-3
    generator_warmup: int = 200
    bn_weight: float = 0.1
    optimizer: str = "adam"
    loss: str = "mse"
    start: str = "auto"
    mix: str = "none"
    feature_weight: Optional[float] = None

    def __post_init__(self):
        _require(self.iters is None or (_is_int(self.iters) and self.iters >= 0),
                 f"`qat.iters` must not be negative, got {self.iters}")
        _require(self.feature_weight is None or (_is_number(self.feature_weight) and self.feature_weight >= 0),
                 f"`qat.feature_weight` must not be negative, got {self.feature_weight}")
        _require(self.mix in QAT_MIXES, f"`qat.mix` must be one of {', '.join(QAT_MIXES)}, got {self.mix!r}")
        _require(self.data in QAT_DATA, f"`qat.data` must be one of {', '.join(QAT_DATA)}, got {self.data!r}")
        _require(self.generator_loss is None or self.generator_loss in GENERATOR_LOSSES,
                 f"`qat.generator_loss` must be one of {', '.join(GENERATOR_LOSSES)}, got {self.generator_loss!r}")
        for name in ("generator_lr", "bn_weight"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, f"`qat.{name}` must be positive, got {value}")
        _require(self.optimizer in QAT_OPTIMIZERS,
                 f"`qat.optimizer` must be one of {', '.join(QAT_OPTIMIZERS)}, got {self.optimizer!r}")
        _require(self.loss in QAT_LOSSES, f"`qat.loss` must be one of {', '.join(QAT_LOSSES)}, got {self.loss!r}")
        _require(self.start in QAT_STARTS, f"`qat.start` must be one of {', '.join(QAT_STARTS)}, got {self.start!r}")
        _require(_is_int(self.generator_warmup) and self.generator_warmup >= 0,
                 f"`qat.generator_warmup` must not be negative, got {self.generator_warmup}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, f"`qat.{name}` must be positive, got {value}")
        for name in ("weight_step_lr", "act_lr"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1, f"`qat.{name}` must be in [0, 1), got {value}")
        _require(_is_int(self.batch_size) and self.batch_size >= 1,
                 f"`qat.batch_size` must be at least 1, got {self.batch_size}")
        _require(_is_int(self.checkpoint_every) and self.checkpoint_every >= 1,
                 f"`qat.checkpoint_every` must be at least 1, got {self.checkpoint_every}")
        _require(self.time_budget is None or (_is_number(self.time_budget) and self.time_budget > 0),
                 f"`qat.time_budget` (seconds) must be positive, got {self.time_budget}")
        _require(not self.resume or self.checkpoint is not None, "`qat.resume` needs `qat.checkpoint`, the file to resume from")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    def batches(self, num_samples: int) -> tuple[int, int]:
        """(images each training step learns from, how many of them the generator makes) with
        ``num_samples`` calibration images: ``generator`` makes the whole batch, ``mixed`` half of
        it (at least one) beside up to the rest from the calibration images, ``calib`` and
        ``auto`` none (the batch is at most the calibration images)."""
        made = 0 if self.data in ("calib", "auto") else max(1, self.batch_size // 2) if self.data == "mixed" \
            else self.batch_size
        return made + min(self.batch_size - made, num_samples), made

    def for_device(self, device_type: str) -> "QatConfig":
        """This config with ``iters`` resolved."""
        return replace(self, iters=self.iters if self.iters is not None else device_defaults(device_type).qat_iters)

    def resolved(self, plain: "Rounding", depthwise: bool) -> "QatConfig":
        """This config with ``start`` ``auto`` made the rounding ``plain`` (as :meth:`RefineConfig.resolved`)
        and ``feature_weight`` None made :data:`AUTO_FEATURE_WEIGHT` on a network without depthwise
        convolutions, 0 on one with them (``depthwise``)."""
        start = _start_from(plain) if self.start == "auto" else self.start
        weight = self.feature_weight
        if weight is None:
            weight = 0.0 if depthwise else AUTO_FEATURE_WEIGHT
        return replace(self, start=start, feature_weight=weight)

    def to_dict(self) -> dict:
        return _to_dict(self)


# --- validation ---------------------------------------------------------------------------------

DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ValidateConfig:
    """Everything ``validate()`` needs besides the two models.

    data:          image folder (class sub-folders = labelled, flat = unlabelled) or .npz;
                   None when images are passed to ``validate()`` in memory.
    preprocess:    recipe for image files (None: the ``imagenet`` preset); unused for arrays.
    class_list:    text file of the model's class names in output order, to label a folder
                   that holds a subset of the classes (default: class folders must match
                   the model's classes one to one, label = sorted position).
    provider:      auto | cuda | cpu.
    batch_size:    samples per call (models with a fixed batch size use theirs).
    max_drop:      gate threshold in top-1 percentage points (needs labels).
    min_agreement: gate threshold on top-1 agreement, fraction 0–1.
    report_path:   where to write the JSON report (atomically), or None.
    extra:         additional top-level report fields (quantize adds bits, simulated,
                   calibration); they may not replace standard keys.
    exclude_files: image files of an image folder to leave out (quantize passes the
                   files it calibrated on, so they are never scored).
    exact:         run the quantized model's QDQ graph as written (DequantizeLinear -> float
                   op -> QuantizeLinear, no fused integer kernels): what a CPU whose int8
                   kernels cannot saturate (VNNI, ARM) computes, on any CPU. For a model made
                   for such a CPU (``reduce_range`` false) scored on x86 without VNNI, where
                   ORT's u8xs8 kernels can saturate; slower.
    per_tensor:    also compare every activation the quantized (QDQ) model quantizes with the
                   float model's tensor of the same name (:mod:`dsgonnx.validation.per_tensor`):
                   where the error enters, and whether a grid's range or step costs it.
    """

    data: Optional[str] = None
    preprocess: Optional[Preprocess] = None
    class_list: Optional[str] = None
    provider: Provider = Provider.AUTO
    batch_size: int = DEFAULT_BATCH_SIZE
    max_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    report_path: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    exclude_files: frozenset = frozenset()
    exact: bool = False
    per_tensor: bool = False

    def __post_init__(self):
        object.__setattr__(self, "provider", Provider.parse(self.provider, "provider"))
        if self.data is not None:
            object.__setattr__(self, "data", os.fspath(self.data))
        _require(_is_int(self.batch_size) and self.batch_size >= 1,
                 f"`batch_size` must be a whole number >= 1, got {self.batch_size!r}")
        check_thresholds(self.max_drop, self.min_agreement)
        object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


# --- quantization ------------------------------------------------------------------------------

Calibration = Union[SynthMethod, Path, Any]  # a method, a path, an array or a SyntheticSet


def _calibration_source(calib):
    """A synthesis method (member), a path (Path), or an in-memory array / SyntheticSet as given."""
    if isinstance(calib, SynthMethod):
        return calib
    if isinstance(calib, str):
        _require(calib.strip() != "", f"`calib` is empty: give {', '.join(SynthMethod.values())}, an image folder "
                                      "or an .npz file")
        return SynthMethod(calib.lower()) if calib.lower() in SynthMethod.values() else Path(calib)
    if isinstance(calib, os.PathLike):
        return Path(calib)
    if hasattr(calib, "images") or hasattr(calib, "shape"):  # SyntheticSet or numpy array
        return calib
    raise DataError(f"`calib` must be {', '.join(SynthMethod.values())}, an image folder, an .npz file, "
                    f"an array or a SyntheticSet; got {type(calib).__name__}")


# the independent images the fallback can check a learned model on (besides the held-out samples)
FALLBACK_PROBES = ("procedural", "inversion")
# synthetic samples made beside the calibration images and kept out of them (quantize's own
# synthesis and `dsgonnx synthesize`): the fallback checks its models, and validation without
# val_data scores them, on these
DEFAULT_HOLDOUT = 16


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize to, calibrated on what, and how to check it (``dsgonnx.quantize``).

    ``calib``: a synthesis method (``auto``, ``dsg``, ``zeroq``, ``gaussian``, ``procedural``,
    ``inversion``; ``auto`` is ``dsg`` where the model has BN statistics), a path to real images
    (an image folder or an ``.npz`` with ``images``), a float32 NCHW array in the model's
    input space, or a :class:`~dsgonnx.SyntheticSet`. ``synth`` tunes the synthesis
    (:class:`SynthOptions`); ``iters=None`` is by device. ``refine``: a
    :class:`RefineConfig` (or just its method, ``"brecq"``) to learn the weight rounding;
    with ``qat`` (``qat.start`` ``refine`` only) the reconstruction QAT starts from.
    ``rounding``: ``squant`` rounds the weights with SQuant's data-free flips instead of to the
    nearest integer; ``auto`` (:meth:`weight_rounding`) does for weights of 4 bits or fewer.
    ``fallback``: after ``refine``, ``qat`` or a ``rounding`` other than nearest, also write
    the plain model (nearest rounding; after ``refine``/``qat``, also the rounding of
    ``plain_rounding()`` when that is SQuant's) and keep the learned model only where its
    logits follow the float model's at least as closely on one probe and not measurably less
    closely on any (a paired bootstrap over the probe's samples): the held-out samples (else
    the calibration images), procedural images (not beside held-out real images or held-out
    samples synthesized from the model's BN statistics, DSG or ZeroQ: those decide alone), and, where
    the calibration images are procedural and ``refine``/``qat`` learn from them, 32 inversion
    images.
    ``fallback_probes``: those independent images, chosen ("procedural", "inversion", both, or
    "none" / an empty sequence: the held-out samples, else the calibration images, alone)
    instead of by that rule. ``keep_candidates``: a folder where the fallback also writes every model it weighed
    (``plain.onnx``, ``squant.onnx``, ``refined.onnx`` / ``trained.onnx``,
    ``refined-uncorrected.onnx``; :func:`dsgonnx.pipeline.candidate_files`), finished like the
    output, to be scored on data the user holds.
    """

    wbits: int = 8
    abits: int = 8
    calib: Calibration = SynthMethod.AUTO
    num_samples: int = 64
    iters: Optional[int] = None
    calibrator: Calibrator = Calibrator.AUTO
    target: Target = Target.CPU
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    logits: LogitsPolicy = LogitsPolicy.EXCLUDE
    bias_correction: BiasCorrection = BiasCorrection.AUTO
    rounding: Rounding = Rounding.AUTO
    cle: bool = False  # cross-layer equalization before calibration (measured: hurts with per-channel weights)
    mixed: bool = False  # keep the most sensitive tensors at 8 bits (simulated widths only)
    mixed_budget: float = 0.05  # share of the weight values (and of the activation tensors) allowed at 8 bits
    pool_range: PoolRange = PoolRange.INPUT  # measured: synthetic data under-ranges pooled features
    first_layer_8bit: bool = True  # below 8 bits, the input and the first layer (weights, output) at 8 bits (measured)
    reduce_range: Optional[bool] = None  # None: decided from the CPU for the cpu target
    seed: int = 0
    device: Device = Device.AUTO
    preprocess: Optional[Preprocess] = None
    input_shape: Optional[tuple[int, int, int, int]] = None
    output: Optional[str] = None
    force: bool = False
    validate: bool = True
    val_data: Optional[str] = None
    # the model's class names in output order, one per line: labels a `val_data` folder that holds
    # a subset of the classes (ValidateConfig.class_list)
    class_list: Optional[str] = None
    # held-out samples (validation without val_data, the fallback's check): made beside the calibration
    # images when quantize synthesizes; at most this many of a set's `holdout` (--calib set.npz); else
    # this many of the source's images not calibrated on (an image folder or array with enough of them)
    holdout: int = DEFAULT_HOLDOUT
    max_drop: Optional[float] = None
    min_agreement: Optional[float] = None
    report: Optional[str] = None
    provider: Provider = Provider.AUTO
    synth: SynthOptions = SynthOptions()
    refine: Optional[RefineConfig] = None
    qat: Optional[QatConfig] = None
    fallback: bool = True  # after refine/qat/squant: plain rounding where it follows the float model more closely
    keep_candidates: Optional[str] = None  # a folder: every model the fallback weighed is written there too
    fallback_probes: Optional[tuple[str, ...]] = None  # independent images the fallback checks on; None: auto

    def __post_init__(self):
        check_bits(self.wbits, self.abits, self.target)
        object.__setattr__(self, "calib", _calibration_source(self.calib))
        for name, kind in (("calibrator", Calibrator), ("target", Target), ("logits", LogitsPolicy),
                           ("bias_correction", BiasCorrection), ("rounding", Rounding), ("pool_range", PoolRange),
                           ("device", Device), ("provider", Provider)):
            object.__setattr__(self, name, kind.parse(getattr(self, name), name))
        object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", parse_input_shape("x".join(map(str, self.input_shape))
                                                                      if not isinstance(self.input_shape, str)
                                                                      else self.input_shape))
        if isinstance(self.refine, (str, RefineMethod)):
            object.__setattr__(self, "refine", RefineConfig(method=self.refine))
        _require(self.refine is None or isinstance(self.refine, RefineConfig),
                 f"`refine` must be a RefineConfig or a method name, got {type(self.refine).__name__}")
        if self.qat is True:
            object.__setattr__(self, "qat", QatConfig())
        _require(self.qat is None or isinstance(self.qat, QatConfig),
                 f"`qat` must be a QatConfig, got {type(self.qat).__name__}")
        _require(self.qat is None or self.refine is None or self.qat.start == "refine",
                 "`qat` and `refine` are two ways to learn the quantized model; choose one (or train from the "
                 "reconstruction's result: `qat.start` 'refine', `refine` its settings)")
        _require(self.refine is None or self.refine.correct_inside is not True or (
                 self.bias_correction != BiasCorrection.OFF and self.qat is None),
                 "`refine.correct_inside` simulates the bias correction quantize writes: it needs `bias_correction` "
                 "(not off) and no `qat` (QAT trains the biases itself)")
        _require(self.rounding in (Rounding.AUTO, Rounding.NEAREST) or (self.refine is None and self.qat is None),
                 f"`rounding` {self.rounding.value} is for models that are not refined or trained (`refine` and "
                 "`qat` learn the rounding); choose one")
        _require(isinstance(self.synth, SynthOptions),
                 f"`synth` must be a SynthOptions, got {type(self.synth).__name__}")
        _require(_is_int(self.num_samples) and self.num_samples >= 1,
                 f"`num_samples` must be at least 1, got {self.num_samples}")
        _require(self.iters is None or (_is_int(self.iters) and self.iters >= 0),
                 f"`iters` must be 0 or more, got {self.iters}")
        _require(_is_int(self.holdout) and self.holdout >= 0, f"`holdout` must not be negative, got {self.holdout}")
        _check_seed(self.seed)
        _require(_is_number(self.mixed_budget) and 0 < self.mixed_budget <= 1,
                 f"`mixed_budget` is a share of the weights in (0, 1], got {self.mixed_budget!r}")
        check_thresholds(self.max_drop, self.min_agreement)
        _require(self.validate or (self.max_drop is None and self.min_agreement is None),
                 "a gate (`max_drop`, `min_agreement`) needs the validation, which is off")
        _require(self.validate or (self.report is None and self.val_data is None),
                 f"{'`report`' if self.report is not None else '`val_data`'} is for the validation, which is off")
        _require(self.class_list is None or self.val_data is not None,
                 "`class_list` labels the class folders of `val_data`; give `val_data`")
        _require(self.max_drop is None or self.val_data is not None,
                 "`max_drop` needs labelled `val_data` (without it quantize validates on held-out samples, "
                 "unlabelled: gate those on `min_agreement`)")
        if self.fallback_probes is not None:
            probes = self.fallback_probes
            probes = tuple(p.strip() for p in probes.split(",")) if isinstance(probes, str) else tuple(probes)
            probes = () if probes == ("none",) else probes  # the held-out samples (else calibration images) alone
            _require(all(p in FALLBACK_PROBES for p in probes) and len(set(probes)) == len(probes),
                     f"`fallback_probes` must name one or both of {', '.join(FALLBACK_PROBES)}, or be none, got "
                     f"{','.join(map(str, probes))!r}")
            object.__setattr__(self, "fallback_probes", probes)
            _require(self._weighs_candidates(),
                     "`fallback_probes` are the images --fallback checks on: it needs the fallback on and `refine`, "
                     f"`qat` or SQuant's rounding (at W{self.wbits} without them quantize writes one model)")
        if self.keep_candidates is not None:
            _require(isinstance(self.keep_candidates, (str, os.PathLike)),
                     f"`keep_candidates` must be a folder path, got {type(self.keep_candidates).__name__}")
            object.__setattr__(self, "keep_candidates", os.fspath(self.keep_candidates))
            _require(self._weighs_candidates(),
                     "`keep_candidates` keeps the models --fallback weighs: it needs the fallback on and `refine`, "
                     f"`qat` or SQuant's rounding (at W{self.wbits} without them quantize writes one model)")

    def _weighs_candidates(self) -> bool:
        """Whether the fallback weighs models against each other: it is on and there is a learned
        or SQuant-rounded model to weigh against plain rounding."""
        return self.fallback and (self.refine is not None or self.qat is not None
                                  or self.weight_rounding() != Rounding.NEAREST)

    def activation_calibrator(self) -> Calibrator:
        """The calibrator ``calibrator`` stands for: ``auto`` is ``mse`` for activations of 4
        bits or fewer (where MinMax's ranges, stretched by rare outliers and widening with
        every image added, leave too few levels for the bulk), else ``minmax``."""
        if self.calibrator != Calibrator.AUTO:
            return self.calibrator
        return Calibrator.MSE if self.abits <= 4 else Calibrator.MINMAX

    def weight_rounding(self) -> Rounding:
        """The rounding ``rounding`` stands for: ``auto`` is ``squant`` for weights of 4 bits or
        fewer that are not refined or trained, else ``nearest``."""
        if self.rounding != Rounding.AUTO:
            return self.rounding
        learned = self.refine is not None or self.qat is not None
        return Rounding.SQUANT if self.wbits <= 4 and not learned else Rounding.NEAREST

    def plain_rounding(self) -> Rounding:
        """The rounding quantize would use without ``refine``/``qat``: what ``--fallback``
        checks a learned model against (besides nearest rounding)."""
        # (without the fallback's own settings, which need a learned model: at W6 there is none)
        return replace(self, refine=None, qat=None, keep_candidates=None, fallback_probes=None).weight_rounding()

    @property
    def synthetic(self) -> bool:
        return isinstance(self.calib, SynthMethod)

    def synth_config(self, num_samples: int, depthwise: bool = False) -> SynthConfig:
        """The synthesis run this config asks for (``num_samples`` includes held-out samples) for
        a model with (or without) depthwise convolutions."""
        options = self.synth
        if options.alignment is None and self.trains_on_calibration_images():
            options = replace(options, alignment=Alignment.BATCH)
        if options.start is None:
            leaves = (self.refine is not None and depthwise and not options.generator
                      and self.synthetic and self.calib in (SynthMethod.AUTO, SynthMethod.ZEROQ, SynthMethod.DSG))
            options = replace(options, start=SynthStart.PROCEDURAL if leaves else SynthStart.GAUSSIAN)
        method = SynthMethod.DSG if self.calib == SynthMethod.AUTO else self.calib  # (auto is dsg wherever it has BN)
        if (not options.has_margins(method, options.alignment or Alignment.SAMPLE)
                and self.qat_generator_loss(self.calib) == "dsg"):
            # the slack settings are QAT's generator's alone (``pipeline._qat_generator``): this synthesis has no margins
            options = options.without_margin_settings()
        return SynthConfig.from_options(options, method=self.calib, num_samples=num_samples, iters=self.iters,
                                        seed=self.seed, device=self.device, preprocess=self.preprocess)

    def qat_generator_loss(self, method) -> Optional[str]:
        """The loss QAT's generator trains with for calibration images made by (or read as) ``method``, or
        None where QAT trains on the calibration images alone (``qat.data`` auto or calib) or does not run:
        ``qat.generator_loss``, else GDFQ's (``bns``) after zeroq and DSG's (``dsg``: slack margins read
        with ``synth.epsilon``/``synth.slack_reading``) otherwise."""
        if self.qat is None or self.qat.data in ("calib", "auto"):
            return None
        return self.qat.generator_loss or ("bns" if method == SynthMethod.ZEROQ else "dsg")

    def trains_on_calibration_images(self) -> bool:
        """Whether reconstruction (``refine``) or QAT (``qat.data`` auto, calib or mixed) trains on
        the calibration images: then synthesis aligns the batch's statistics unless
        ``synth.alignment`` says otherwise."""
        return self.refine is not None or (self.qat is not None and self.qat.data != "generator")

    def to_dict(self) -> dict:
        data = _to_dict(self)
        if not isinstance(self.calib, (SynthMethod, Path)):
            data["calib"] = type(self.calib).__name__
        return data


__all__ = [
    "BN_FREE_DEFAULT", "BiasCorrection", "Calibrator", "Choice", "DEFAULT_BATCH_SIZE", "DEFAULT_EPSILON", "Device", "DeviceDefaults", "LogitsPolicy", "NATIVE_BITS",
    "PoolRange", "Provider", "QatConfig", "QuantConfig", "RefineConfig", "RefineMethod", "Rounding", "SUPPORTED_BITS", "SlackReading", "SynthConfig",
    "SynthMethod", "SynthOptions", "SynthStart", "Target", "ValidateConfig", "check_bits", "check_thresholds", "device_defaults",
]
