"""Fake quantizers for reconstruction: learned weight rounding and fixed activation grids.

:class:`QuantLayer` wraps a converted ``Conv``/``Linear`` module. Its weight is quantized
symmetrically on a B-bit grid ``s·q``, ``q ∈ [-top, top]``, with ``q = ⌊w/s⌋ + h`` where
``h`` is AdaRound's rectified sigmoid of a learned ``V`` while training ("soft") and
``1[V ≥ 0]`` once decided ("hard"). ``s`` is set before training (per output channel,
the clipping ratio that minimises ‖w − s·round(w/s)‖²); reconstruction may learn it with the
rounding (``s'·clamp(⌊w/s⌋ + h)``, Genie-M's: :meth:`QuantLayer.settle`). Its bias is held, as ONNX Runtime
exports it, as int32 on the grid of the input's scale times ``s`` — less, after
:meth:`QuantLayer.correct_for`, the shift ΔW·E[x] that quantize's bias correction will subtract
(:mod:`dsgonnx.quant.correct`), so that the learned rounding is the one of the corrected model
written. Activations are quantized apart
from the layers, by an :class:`ActQuant` on every tensor the exported model quantizes
(:mod:`.simulate`).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches exactly 0 and 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def weight_scales(weight: torch.Tensor, top: int, axis: Optional[int], search: bool = True,
                  ratios: int = 40) -> torch.Tensor:
    """Symmetric scales of ``weight`` (per ``axis`` slice, or one for the tensor).

    With ``search`` the clipping ratio r ∈ [0.3, 1] of max|w| that minimises the rounding
    error of each slice is chosen; without, r = 1 (ONNX Runtime's own choice)."""
    w = weight.detach().double()
    flat = w.reshape(1, -1) if axis is None else w.movedim(axis, 0).reshape(w.shape[axis], -1)
    peak = flat.abs().amax(1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    best_scale = peak / top
    if search:
        best_error = torch.full_like(peak, math.inf)
        for ratio in torch.linspace(0.3, 1.0, ratios, dtype=torch.float64):
            scale = peak * ratio / top
            q = torch.clamp(torch.round(flat / scale[:, None]), -top, top)
            error = ((q * scale[:, None] - flat) ** 2).sum(1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_scale = torch.where(better, scale, best_scale)
    return best_scale.float()


# the bytes of an int64 from ``random_()`` that are uniform: it holds 63 random bits, the
# most significant byte only 7 of them
_UNIFORM_BYTES = slice(0, 7) if sys.byteorder == "little" else slice(1, 8)


def random_mask(shape, prob: float, generator: Optional[torch.Generator], device=None) -> torch.Tensor:
    """A boolean tensor of ``shape``, each element True with probability ``prob``, independently,
    drawn from ``generator``: each uniform random byte compared with round(256·prob), so
    ``prob`` counts to the nearest 1/256 (at least 1/256 and at most 255/256 where
    0 < prob < 1). Seven bytes come from each 64-bit draw: on CPU a quarter of the cost of
    ``torch.rand(shape) < prob`` (a float per element), which took as long as the depthwise
    convolution whose input QDrop masks (EfficientNet-Lite0)."""
    if not 0 < prob < 1:
        return torch.full(tuple(shape), prob >= 1, dtype=torch.bool, device=device)
    threshold = min(max(round(float(prob) * 256), 1), 255)  # never 0 or 1 unless asked for
    count = math.prod(shape)
    words = torch.empty((count + 6) // 7, dtype=torch.int64, device=device).random_(generator=generator)
    uniform = words.view(torch.uint8).view(-1, 8)[:, _UNIFORM_BYTES].reshape(-1)[:count]
    return (uniform < threshold).view(tuple(shape))


class ActQuant(nn.Module):
    """Fake-quantize to ``scale·(clamp(round(x/scale)+zero, low, high) − zero)``.

    ``drop_prob`` > 0 keeps each element unquantized with that probability (to 1/256) while
    training (QDrop, Wei et al. 2022), drawn from ``generator`` (on the tensors' device; :func:`random_mask`). After
    :meth:`learn_step` the scale is learned (LSQ, Esser et al. 2020: the straight-through
    rounding gives its gradient), as ``exp`` of a parameter so that Adam's steps are relative;
    :meth:`share_step` ties another quantizer to the same parameter (tensors ORT puts on one
    grid)."""

    def __init__(self, scale: float, zero_point: int, low: int, high: int):
        super().__init__()
        self.scale, self.zero_point, self.low, self.high = float(scale), int(zero_point), int(low), int(high)
        self.enabled = True
        self.drop_prob = 0.0
        self.generator: Optional[torch.Generator] = None
        self.log_step: Optional[nn.Parameter] = None
        # the fixed scale as a float32 tensor that moves with the module (biases are rounded on it)
        self.register_buffer("fixed_step", torch.tensor(self.scale, dtype=torch.float32))

    def learn_step(self) -> nn.Parameter:
        self.log_step = nn.Parameter(torch.tensor(math.log(self.scale), dtype=torch.float32))
        return self.log_step

    def share_step(self, parameter: nn.Parameter) -> None:
        self.log_step = parameter

    def step(self) -> torch.Tensor:
        """The scale now, as a float32 tensor (the exported value)."""
        return self.fixed_step if self.log_step is None else torch.exp(self.log_step)

    def start_dropping(self, prob: float, generator: torch.Generator) -> None:
        self.drop_prob, self.generator = prob, generator

    def stop_dropping(self) -> None:
        self.drop_prob, self.generator = 0.0, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        keep = (random_mask(x.shape, self.drop_prob, self.generator, x.device)
                if self.training and self.drop_prob > 0 else None)
        if self.log_step is None:
            return _FixedStep.apply(x, self.scale, self.zero_point, self.low, self.high, keep)
        scale = torch.exp(self.log_step).to(x.dtype)  # learned (LSQ)
        return _LearnedStep.apply(x, scale, self.zero_point, self.low, self.high, keep)


class _FixedStep(torch.autograd.Function):
    """:class:`ActQuant` on a fixed step as one node of the graph, with the values and the
    gradient of its chain of operations under torch 2.14 (up to the sign of a zero): the rounding
    straight through, none where the clamp bites or the level is the range's end (earlier torch
    releases passed it on the ends, measured no different in the README; here it no longer
    depends on the release), ``keep``'s elements (QDrop's) passed as they are. The chain saved a
    float tensor per clamp and selected with ``torch.where`` on boolean masks, ten times a
    multiplication on a CPU; this saves the masks as bytes and selects with :func:`choose`."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, low: int, high: int, keep):
        levels = torch.round(x / scale).add_(zero_point)
        # where the gradient passes (torch 2.14's clamp: not on the ends either); none to keep without one
        inside = (levels > low).logical_and_(levels < high) if ctx.needs_input_grad[0] else None
        xq = levels.clamp_(low, high).sub_(zero_point).mul_(scale)
        ctx.scale = scale
        ctx.save_for_backward(inside, keep)
        return xq if keep is None else choose(keep, x, xq)

    @staticmethod
    def backward(ctx, grad):
        inside, keep = ctx.saved_tensors
        return _straight_through(grad, ctx.scale, inside, keep), None, None, None, None, None


def _straight_through(grad: torch.Tensor, scale, inside: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """An activation quantizer's input gradient as autograd chains it: × step (the
    dequantization), the clamp's mask ``inside``, ÷ step (x / step); ``keep``'s elements (QDrop's)
    passed as they are."""
    through = (grad * scale).mul_(_as_weights(inside, grad)).div_(scale)
    return through if keep is None else choose(keep, grad, through)


class _LearnedStep(torch.autograd.Function):
    """:class:`ActQuant` on a learned step (LSQ) as one node of the graph: the values of the chain
    ``(clamp(round_ste(x / step) + zero, low, high) − zero) · step``, its gradient to ``x`` as
    :class:`_FixedStep` gives it, and to the step the chain's sum Σ g·((q − zero) − inside·x/step),
    in one sum (so equal to the chain's up to the order of float additions). It keeps one float
    tensor and the mask's bytes for the backward pass; forward and backward of a 64×64×56×56
    activation took 202–219 ms against the chain's 339–402 ms on the project's 2-core CPU
    (``benchmarks/act_quant_speed.py``), and EfficientNet-Lite0's QAT peaked at 11.2 GB
    instead of 13.2 GB."""

    @staticmethod
    def forward(ctx, x, scale: torch.Tensor, zero_point: int, low: int, high: int, keep):
        v = x / scale
        levels = torch.round(v).add_(zero_point)
        inside = (levels > low).logical_and_(levels < high)
        shifted = levels.clamp_(low, high).sub_(zero_point)  # q − zero
        xq = shifted * scale
        # the step's gradient per element, over g: q − zero outside the clamp, round(v) − v inside
        # (where q − zero is round(v)): q − zero − inside·v; none where QDrop keeps the float value
        slope = torch.addcmul(shifted, v, _as_weights(inside, v), value=-1)
        if keep is not None:
            slope.masked_fill_(keep, 0.0)
        ctx.save_for_backward(scale, inside, keep, slope)
        return xq if keep is None else choose(keep, x, xq)

    @staticmethod
    def backward(ctx, grad):
        scale, inside, keep, slope = ctx.saved_tensors
        grad_x = _straight_through(grad, scale, inside, keep) if ctx.needs_input_grad[0] else None
        grad_scale = torch.sum(grad * slope).reshape(scale.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_scale, None, None, None, None


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A boolean mask as 0/1 in ``like``'s dtype (through its bytes: a tenth of the time of a
    boolean conversion on a CPU)."""
    return mask.view(torch.uint8).to(like.dtype)


def choose(mask: torch.Tensor, where_true: torch.Tensor, where_false: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, where_true, where_false)`` for finite float tensors of one shape, the
    same values (``lerp`` with weights exactly 0 and 1 returns either end as it is)."""
    return torch.lerp(where_false, where_true, _as_weights(mask, where_true))


class ConstQuant(nn.Module):
    """A constant input as the QDQ model dequantizes it (a MatMul's weight, a
    LayerNormalization's scale, an Add's constant, ...): ``values`` (the exported integers times
    their scales) where ``enabled``, else its input, the float constant (reconstruction computes
    its float targets with it off). Used as a module in front of the reader, or as a
    parametrization of the tensor a converted module holds (:mod:`.simulate`).

    An int32 bias (a LayerNormalization's, an unrefined Conv's) is on the grid of the input's
    step times the weight's, which learned activation steps move: after :meth:`on_grid_of` it
    is rounded from its float value on that grid, as ORT writes it."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.enabled = True
        self.register_buffer("values", torch.from_numpy(np.array(values, dtype=np.float32)))
        self.register_buffer("weight_scales", None)
        self._input: tuple = ()  # the ActQuant of the reader's input (not a submodule: it lives in the graph)

    def on_grid_of(self, input_quant: "ActQuant", weight_scales: np.ndarray) -> None:
        self._input = (input_quant,)
        self.weight_scales = torch.from_numpy(np.array(weight_scales, dtype=np.float32).reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self._input:
            return self.values.to(x.dtype)
        # ORT: the scale product in float32, the division in float64, dequantized in float32
        scale = self._input[0].step().detach().to(x.device) * self.weight_scales
        info = torch.iinfo(torch.int32)
        integers = torch.round(x.detach().double() / scale.double()).clamp(info.min, info.max)
        return (integers.float() * scale).to(x.dtype)


class QuantLayer(nn.Module):
    """A Conv/Linear with a B-bit weight grid.

    Modes: ``fp`` (the float layer), ``nearest`` (round to nearest), ``soft``/``hard``
    (AdaRound's learned rounding while training / decided), ``train`` (quantization-aware
    training: the float weight and bias learn through straight-through rounding, and after
    :meth:`learn_scale` the per-channel step too, LSQ-style; the exported integers are then the
    nearest ones on the learned step)."""

    MODES = ("fp", "nearest", "soft", "hard", "train")

    def __init__(self, inner: nn.Module, scale: torch.Tensor, top: int, axis: Optional[int]):
        super().__init__()
        if not isinstance(inner, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise TypeError(f"cannot quantize {type(inner).__name__}")
        self.inner = inner
        self.top, self.axis = int(top), axis
        shape = [1] * inner.weight.dim()
        if axis is not None:
            shape[axis] = -1
        self.register_buffer("scale", scale.reshape(shape).to(inner.weight.dtype))
        self.mode = "fp"
        self.alpha: Optional[nn.Parameter] = None
        self.log_scale: Optional[nn.Parameter] = None  # the learned step (log): mode "train", or reconstruction's
        self.register_buffer("decided", None)  # the learned integers once settled on a learned step (settle)
        self._input: tuple = ()  # the ActQuant of the input (not a submodule: it lives in the graph)
        self.register_buffer("input_mean", None)  # E[x] of each output channel's inputs (correct_for)

    def learn_scale(self) -> nn.Parameter:
        """Make the weight step learnable (as its log, so Adam's steps are relative)."""
        self.log_scale = nn.Parameter(torch.log(self.scale.detach().clone()))
        return self.log_scale

    def fix_scale(self) -> None:
        """Keep the learned step as the layer's (fixed) scale."""
        if self.log_scale is not None:
            with torch.no_grad():
                self.scale.copy_(torch.exp(self.log_scale))
            self.log_scale = None

    def step(self) -> torch.Tensor:
        """The weight step now (learned or fixed)."""
        return self.scale if self.log_scale is None else torch.exp(self.log_scale)

    def settle(self) -> None:
        """End reconstruction that learned the step with the rounding (Genie-M's, Jeon et al.
        2023: ``s'·clamp(⌊w/s⌋ + h)``, the floors on the grid the learning started from):
        keep the decided integers and make the learned step the layer's scale."""
        if self.log_scale is None:
            return
        self.decided = self.integers().detach().clone()
        self.fix_scale()

    def quantize_bias_on(self, input_quant: "ActQuant") -> None:
        """Hold the bias as ORT exports it for an input quantized by ``input_quant``."""
        self._input = (input_quant,)

    @property
    def bias_quantized(self) -> bool:
        """Whether the bias is held as ORT exports it (:meth:`quantize_bias_on`)."""
        return self.inner.bias is not None and bool(self._input)

    def correct_for(self, mean: np.ndarray) -> None:
        """Subtract ΔW·E[x] from the bias in the rounding modes (``mean``: E[x] per input
        channel), as bias correction does to the written model (:func:`~dsgonnx.quant.correct.correct_biases`:
        ΔW = Q(W) − W against this layer's float weight); in ``soft`` mode the shift follows the
        soft rounding, so reconstruction learns the rounding of the corrected layer."""
        weight = self.inner.weight
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        if isinstance(self.inner, nn.Linear):
            if mean.numel() != weight.shape[1]:
                raise ValueError(f"input mean of {mean.numel()} channels for a Linear of {weight.shape[1]} inputs")
            rows = mean.reshape(1, -1).expand(weight.shape[0], -1)
        else:  # each group of output channels reads its own input channels
            groups, per_group = self.inner.groups, weight.shape[1]
            if mean.numel() != groups * per_group:
                raise ValueError(f"input mean of {mean.numel()} channels for a Conv of {groups * per_group} inputs")
            rows = mean.reshape(groups, per_group)[torch.arange(weight.shape[0]) // (weight.shape[0] // groups)]
        self.input_mean = rows.to(device=weight.device, dtype=torch.float64)

    def mean_shift(self, weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """ΔW·E[x] per output channel in the current rounding mode (``weight``: Q(W) if already
        computed; None: no mean set, or a mode without a correction: ``fp``, ``train``)."""
        if self.input_mean is None or self.mode not in ("nearest", "soft", "hard"):
            return None
        delta = (self.quantized_weight() if weight is None else weight) - self.inner.weight.detach()
        spatial = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2) if delta.dim() > 2 else delta
        return (spatial.double() * self.input_mean).sum(1)

    def quantized_bias(self, weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The bias on ORT's int32 grid: round(b / (input scale·s)), with the scale product in
        float32 and the division in float64 as ORT computes them; the float bias without an
        input grid. After :meth:`correct_for`, b − ΔW·E[x] as bias correction writes it: the
        shift in steps rounded (straight through, so the soft rounding learns through it) and
        taken from b's integers; a layer without a bias gets a float one, as bias correction
        adds."""
        bias = self.inner.bias
        shift = self.mean_shift(weight)
        if shift is not None:
            if bias is None or not self._input:
                corrected = -shift if bias is None else bias.detach().double() - shift
                return corrected.to(self.inner.weight.dtype)
            scale = (self._input[0].step().detach().to(bias.device) * self.step().detach().reshape(-1).float()).double()
            info = torch.iinfo(torch.int32)
            # as the written model gets it: ORT's integers of b, less the shift in steps, rounded
            # (bias correction rewrites the int32 bias; one rounding of b − shift differs by a step)
            integers = torch.round(bias.detach().double() / scale) - round_ste(shift / scale)
            return (integers.clamp(info.min, info.max).float() * scale.float()).to(bias.dtype)
        if bias is None or not self._input:
            return bias
        if self.mode == "train":  # rounded straight through: the bias and both steps learn
            scale = self._input[0].step().to(bias.device) * self.step().reshape(-1).float()
            return round_ste(bias / scale) * scale
        scale = self._input[0].step().detach().to(bias.device) * self.step().detach().reshape(-1).float()
        info = torch.iinfo(torch.int32)
        integers = torch.round(bias.detach().double() / scale.double()).clamp(info.min, info.max)
        return (integers.float() * scale).to(bias.dtype)

    # -- rounding -----------------------------------------------------------------------
    def init_rounding(self, integers: Optional[torch.Tensor] = None) -> None:
        """V such that h(V) equals the fractional part of w/s (training starts at the float
        weight). With ``integers`` (another rounding of the weight: each element its floor or
        ceiling), the elements it rounds the other way from nearest start mirrored about ½ —
        as far on the side of its integer as they were on the nearest one's — so that deciding
        at once would give ``integers``."""
        scaled = self.inner.weight.detach() / self.scale
        floor = torch.floor(scaled)
        rest = scaled - floor
        if integers is not None:
            up = integers.to(scaled) - floor
            flip = (integers.to(scaled) != self.nearest_integers()) & ((up == 0) | (up == 1))
            mirrored = torch.where(up == 1, (1 - rest).clamp(min=0.5 + 1e-3), (1 - rest).clamp(max=0.5 - 1e-3))
            rest = torch.where(flip, mirrored, rest)
        rest = rest.clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def squant_integers(self) -> torch.Tensor:
        """SQuant's integers of the weight on this layer's grid
        (:func:`~dsgonnx.quant.rounding.squant_integers`: nearest rounding, then the kernel
        and channel flips)."""
        from ..quant.rounding import squant_integers

        weight = self.inner.weight.detach()
        scales = self.scale.detach().reshape(-1).double().cpu().numpy()
        if scales.size != weight.shape[0]:  # one step for the tensor
            scales = np.full(weight.shape[0], scales[0])
        integers = squant_integers(weight.double().cpu().numpy(), scales, -self.top, self.top)
        return torch.from_numpy(integers).to(weight)

    def soft_bits(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regulariser(self, beta: float) -> torch.Tensor:
        """AdaRound's push of every h towards 0 or 1: Σ 1 − |2h − 1|^β."""
        return (1 - (2 * self.soft_bits() - 1).abs().pow(beta)).sum()

    def nearest_integers(self) -> torch.Tensor:
        """The weight's integers under plain rounding to nearest."""
        return torch.clamp(torch.round(self.inner.weight.detach() / self.scale), -self.top, self.top)

    def integers(self) -> torch.Tensor:
        """The weight's integers in the current mode (``hard``: learned; otherwise nearest)."""
        if self.mode == "hard" and self.decided is not None:
            return self.decided
        if self.mode != "hard" or self.alpha is None:
            return self.nearest_integers()
        scaled = self.inner.weight.detach() / self.scale
        return torch.clamp(torch.floor(scaled) + (self.alpha.detach() >= 0).to(scaled.dtype), -self.top, self.top)

    def quantized_weight(self) -> torch.Tensor:
        if self.mode == "train":
            step = self.step()
            return torch.clamp(round_ste(self.inner.weight / step), -self.top, self.top) * step
        if self.mode == "soft":  # the floors on the grid learning started from, times the step (learned or not)
            scaled = self.inner.weight.detach() / self.scale
            q = torch.clamp(torch.floor(scaled) + self.soft_bits(), -self.top, self.top)
            return q * self.step()
        return self.integers() * self.step()

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp":
            return self.inner(x)
        weight = self.quantized_weight()
        bias = self.quantized_bias(weight)
        if isinstance(self.inner, nn.Linear):
            return F.linear(x, weight, bias)
        return self.inner._conv_forward(x, weight, bias)
