"""Data-free weight rounding: SQuant's flips (Guo et al., ICLR 2022), from the weights alone.

Rounding each weight to its nearest integer makes every element's error as small as it can
be, but the errors of one kernel (and of one output channel) add up: for an input that is
roughly constant over a kernel's window — the common case — the output moves by the kernel's
*summed* error. SQuant approximates the Hessian of the task loss by its diagonal plus the
kernel-wise and channel-wise blocks and keeps all three terms small: starting from nearest
rounding (element term), it flips the rounding of the elements closest to the rounding
boundary (error near ±0.5, so that flipping costs least) until each kernel's summed error is
at most 0.5 in magnitude (kernel term), then flips one more element in as many of an output
channel's kernels as its summed error needs, the kernels whose error has the same sign and
is largest first (channel term). No data, no gradients, milliseconds per layer.

Read from the paper; the code is ours. The result is a grid per weight in the same form as
reconstruction's (:class:`dsgonnx.refine.reconstruct.RefinedWeight`), exported the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .qdq import quantized_weights


def _movable(q: np.ndarray, error: np.ndarray, sign: np.ndarray, low: int, high: int) -> np.ndarray:
    """The elements whose error has ``sign`` (broadcast against them) and that one step
    against it keeps within [low, high]."""
    moved = q - sign
    return (sign * error > 0) & (moved >= low) & (moved <= high)


def _top(score: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per row of ``score``, the ``count`` entries that score highest, never a -inf one."""
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(score.shape[1]), score.shape), axis=1)
    return np.isfinite(score) & (rank < count[:, None])


def _flip(q: np.ndarray, error: np.ndarray, count: np.ndarray, sign: np.ndarray, low: int, high: int) -> None:
    """In place, row by row of ``q``/``error`` (units × elements): move the ``count`` elements
    whose error has the row's ``sign`` and is largest (closest to the boundary) down by one
    step times that sign, within [low, high]."""
    movable = _movable(q, error, sign[:, None], low, high)
    chosen = _top(np.where(movable, sign[:, None] * error, -np.inf), count)
    q -= sign[:, None] * chosen
    error -= sign[:, None] * chosen


def squant_integers(weight: np.ndarray, scales: np.ndarray, low: int, high: int) -> np.ndarray:
    """The integers of ``weight`` (output channels first, any trailing shape) on ``scales``
    (one per output channel) in [low, high]: nearest rounding, then the kernel and channel
    flips. A 2-D weight (a fully connected layer) has one "kernel" per row."""
    out = weight.shape[0]
    values = weight.reshape(out, weight.shape[1] if weight.ndim > 2 else 1, -1).astype(np.float64)
    values = values / scales.reshape(out, 1, 1).astype(np.float64)
    q = np.clip(np.rint(values), low, high)  # ORT's rounding: half to even, then clipped
    error = q - values  # in [-0.5, 0.5]
    kernels, size = values.shape[0] * values.shape[1], values.shape[2]
    q2, e2 = q.reshape(kernels, size), error.reshape(kernels, size)
    # kernel term: each kernel's summed error within ±0.5
    total = e2.sum(axis=1)
    _flip(q2, e2, np.rint(np.abs(total)).astype(np.int64), np.sign(total), low, high)
    if values.shape[1] > 1:
        # channel term: one more flip in each of the kernels that carry the channel's error
        q3, e3 = q2.reshape(out, values.shape[1], size), e2.reshape(out, values.shape[1], size)
        per_kernel = e3.sum(axis=2)
        total = per_kernel.sum(axis=1)
        sign = np.sign(total)
        # a kernel can take a flip only if it has an element of the channel's sign to flip
        flippable = _movable(q3, e3, sign[:, None, None], low, high).any(axis=2)
        count = np.minimum(np.rint(np.abs(total)).astype(np.int64), flippable.sum(axis=1))
        rows = _top(np.where(flippable, sign[:, None] * per_kernel, -np.inf), count).reshape(kernels)
        sub_q, sub_e = q2[rows], e2[rows]
        kernel_sign = np.repeat(sign, values.shape[1])[rows]
        _flip(sub_q, sub_e, np.ones(len(sub_q), dtype=np.int64), kernel_sign, low, high)
        q2[rows], e2[rows] = sub_q, sub_e
    return q2.reshape(weight.shape).astype(np.int64)


def squant_model(model_path: Path, output_path: Path, *, exclude: set[str], per_channel: bool,
                 weight_range: tuple[int, int], weight_ranges: Optional[dict] = None) -> tuple[dict, dict]:
    """SQuant's integers for every weight ORT quantizes in ``model_path`` (except ``exclude``d
    nodes) on the grid ORT's symmetric quantizer gives it: integers in ``weight_range``
    (``weight_ranges``: weight name -> another range, for the 8-bit first layer), scale
    2·max|w| / (high − low) per output channel or per tensor — max|w|/127 for INT8, 2·max|w|/15
    for INT4 (ORT's [-8, 7]). Writes the model with each such weight replaced by scale·integer
    to ``output_path``; returns (weight name -> RefinedWeight, report)."""
    from ..refine.reconstruct import RefinedWeight

    model = onnx.load(str(model_path))
    initializers = {t.name: t for t in model.graph.initializer}
    grids, flipped, total = {}, 0, 0
    for site in quantized_weights(model, exclude):
        if site.node.op_type == "MatMul" or site.axis is None or site.weight in grids:  # (SQuant was measured
            continue  # on Conv/Gemm weights: a MatMul's is rounded to nearest), or shared
        weight = numpy_helper.to_array(initializers[site.weight]).astype(np.float64)
        low, high = (weight_ranges or {}).get(site.weight, weight_range)
        moved = np.moveaxis(weight, site.axis, 0)
        if per_channel:
            scales = np.abs(moved).reshape(moved.shape[0], -1).max(axis=1) * 2 / (high - low)
        else:
            scales = np.full(moved.shape[0], np.abs(moved).max() * 2 / (high - low))
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        integers = squant_integers(moved, scales, low, high)
        nearest = np.clip(np.rint(moved / scales.reshape(-1, *[1] * (moved.ndim - 1))), low, high)
        flipped += int((integers != nearest).sum())
        total += integers.size
        quantized = integers * scales.astype(np.float64).reshape(-1, *[1] * (moved.ndim - 1))
        values = np.moveaxis(quantized, 0, site.axis).astype(np.float32)
        initializers[site.weight].CopyFrom(numpy_helper.from_array(values, site.weight))
        grids[site.weight] = RefinedWeight(integers=np.moveaxis(integers, 0, site.axis),
                                           scales=scales if per_channel else scales[:1],
                                           axis=site.axis if per_channel else None)
    onnx.save(model, str(output_path))
    report = {"method": "squant", "weights": len(grids), "rounded_other_way": flipped, "values": total}
    return grids, report
