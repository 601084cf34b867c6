"""Which integer types a bit width becomes on a target, and what is simulated.

====  ===============================  ===========================================
bits  cpu (u8 activations, s8 weights)  gpu / trt (symmetric)
====  ===============================  ===========================================
8     uint8 act, int8 per-channel w      int8 both
4     UINT4 act, INT4 w (opset 21)       INT4 both (gpu only)
      (4-bit activations beside wider weights are simulated in 8-bit containers: ORT
      fuses those Q/DQ pairs into QLinearConv/QLinearMatMul, which take no 4-bit input)
16    uint16 act, int16 w (opset 21)     int16 both (gpu only)
2,3,5,6,7  simulated exactly: the B-bit grid in 8-bit containers (weights: per-channel
      scales of the B-bit grid; activations: B-bit scale/zero point and an integer Clip to
      the B-bit range between QuantizeLinear and DequantizeLinear). gpu only, not trt.
====  ===============================  ===========================================
TensorRT runs symmetric int8 only, so ``trt`` takes 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxruntime.quantization import QuantType

from ..config import SUPPORTED_BITS, Target, check_bits

TARGETS = Target.values()
_WIDTHS = {QuantType.QInt4: 4, QuantType.QUInt4: 4, QuantType.QInt8: 8, QuantType.QUInt8: 8,
           QuantType.QInt16: 16, QuantType.QUInt16: 16}


@dataclass(frozen=True)
class BitSpec:
    """Integer types and grid for one side (weights or activations)."""

    bits: int
    quant_type: QuantType  # the container type written into the model
    symmetric: bool

    @property
    def simulated(self) -> bool:
        """The grid is narrower than its container (an integer Clip / B-bit weight scales)."""
        return self.bits != _WIDTHS[self.quant_type]

    @property
    def needs_opset21(self) -> bool:
        return _WIDTHS[self.quant_type] in (4, 16)

    @property
    def levels(self) -> tuple[int, int]:
        """Lowest and highest integer of the B-bit grid inside the container."""
        if self.symmetric:
            top = 2 ** (self.bits - 1) - 1
            return -top, top
        return 0, 2**self.bits - 1


def _container(bits: int, signed: bool) -> QuantType:
    if bits == 4:
        return QuantType.QInt4 if signed else QuantType.QUInt4
    if bits == 16:
        return QuantType.QInt16 if signed else QuantType.QUInt16
    return QuantType.QInt8 if signed else QuantType.QUInt8


def resolve_bits(wbits: int, abits: int, target: str) -> tuple[BitSpec, BitSpec]:
    """(weights, activations) for ``target``; unsupported combinations raise DataError."""
    check_bits(wbits, abits, target)
    symmetric_activations = target in ("gpu", "trt")
    weights = BitSpec(wbits, _container(wbits, signed=True), symmetric=True)
    container = 8 if abits == 4 and wbits != 4 else abits
    activations = BitSpec(abits, _container(container, signed=symmetric_activations), symmetric=symmetric_activations)
    return weights, activations


def tag(wbits: int, abits: int) -> str:
    return f"w{wbits}a{abits}"
