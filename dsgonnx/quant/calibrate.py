"""Activation ranges from calibration images: ORT's calibrators plus an MSE clipping search.

Every method returns ONNX Runtime's own ``TensorsData`` (tensor name -> range), the one
thing its quantizer consumes, so the quantizer never knows which calibrator ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
from onnxruntime.quantization.calibrate import TensorData, TensorsData, create_calibrator
from onnxruntime.quantization.calibrate import entropy as kl_divergence
from onnxruntime.quantization.quant_utils import smooth_distribution

from .. import hardware
from ..config import Calibrator
from ..runtime import quiet_ort
from .bits import BitSpec
from .reader import ArrayReader

CALIBRATORS = Calibrator.values()
_ORT_METHOD = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,  # its histogram collection; entropy_range picks the range
    "mse": CalibrationMethod.Entropy,  # the same collection; mse_range picks the range
}
# histogram bins of the entropy and MSE searches (TensorRT's 2048). ORT's entropy calibrator
# collects 128 and merges them into 128 quantized bins: one candidate, the observed min/max.
HISTOGRAM_BINS = 2048
_AVERAGING = ("GlobalAveragePool", "AveragePool", "ReduceMean")
_SAME_VALUES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")  # outputs hold the input's values
# the share of the memory available that the outputs a calibrator collects may take: the
# histogram calibrators (entropy, mse) keep every tensor of every batch until a run of batches
# ends, then copy each tensor's batches twice to make its histogram (MobileNet v1 0.25 W4A4 at
# 224 px: 14.8 MiB more peak memory per image, 8.0 GiB for 500 images in one run)
COLLECTED_MEMORY_SHARE = 0.4


def compute_ranges(model_path: Path, reader: ArrayReader, method: str, activations: BitSpec,
                   specs: Optional[dict[str, BitSpec]] = None) -> TensorsData:
    """Ranges of every float activation of ``model_path`` over the reader's images, for the
    grid of ``activations`` (``specs``: tensor name -> another grid; only ``mse`` depends on it)."""
    method = Calibrator.parse(method, "calibrator").value
    if method not in _ORT_METHOD:  # "auto" stands for a method by bit width (QuantConfig.activation_calibrator)
        raise ValueError(f"compute_ranges needs a calibration method, not {method!r}")
    options = {"symmetric": activations.symmetric}
    if method in ("mse", "entropy"):
        options.update(num_bins=HISTOGRAM_BINS)
    with tempfile.TemporaryDirectory(prefix="dsgonnx-calib-") as scratch, quiet_ort():
        calibrator = create_calibrator(
            Path(model_path),
            None,
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=_ORT_METHOD[method],
            providers=["CPUExecutionProvider"],
            extra_options=options,
        )
        reader.rewind()
        runs = _Runs(reader, calibrator, _collected_budget())
        if not runs.more:
            raise ValueError("compute_ranges: the reader gave no images")
        while runs.more:  # one run unless the collected outputs would outgrow the budget
            calibrator.collect_data(runs)
        if method in ("mse", "entropy"):
            search = mse_range if method == "mse" else entropy_range
            return TensorsData(
                CalibrationMethod.MinMax,
                {name: search(hist, edges, lo, hi, (specs or {}).get(name, activations))
                 for name, (hist, edges, lo, hi, _) in calibrator.collector.histogram_dict.items()},
            )
        return calibrator.compute_data()


def _collected_budget() -> Optional[int]:
    have = hardware.available_memory()
    return None if have is None else int(COLLECTED_MEMORY_SHARE * have)


class _Runs(CalibrationDataReader):
    """The reader's batches in runs, each run one ``collect_data`` of ``calibrator``, ended
    before the outputs the calibrator holds would pass ``budget`` bytes (None: one run). ORT's
    calibrators merge runs: MinMax exactly, the histograms by widening the first run's bins to
    the new values (the same bin width, more bins), so a set that fits in one run is calibrated
    exactly as before."""

    def __init__(self, reader: CalibrationDataReader, calibrator, budget: Optional[int]):
        self.reader, self.calibrator, self.budget = reader, calibrator, budget
        self.runs = 0
        self.peak = 0  # the most bytes of collected outputs held at once
        self._sizes: list[int] = []  # bytes of each batch's outputs the calibrator holds
        self._ahead = reader.get_next()

    @property
    def more(self) -> bool:
        return self._ahead is not None

    def get_next(self):
        held = self.calibrator.intermediate_outputs
        if len(held) < len(self._sizes):  # the calibrator ended a run and let its outputs go
            self._sizes = []
        self._sizes += [sum(value.nbytes for value in outputs if value is not None)
                        for outputs in held[len(self._sizes):]]
        self.peak = max(self.peak, sum(self._sizes))
        if self._ahead is None:
            return None
        if held and self.budget is not None and sum(self._sizes) + self._sizes[-1] > self.budget:
            return None  # the next batch would pass the budget: end this run
        if not held:
            self.runs += 1
        batch, self._ahead = self._ahead, self.reader.get_next()
        return batch


def entropy_range(hist: np.ndarray, edges: np.ndarray, low: float, high: float, spec: BitSpec) -> TensorData:
    """The range whose quantized histogram is closest (KL divergence) to the observed one:
    ORT's search (TensorRT's), over windows [-t, t] of the histogram, merged into as many bins
    as the grid has levels in that window (its levels for a symmetric grid; twice them for
    an asymmetric one, whose levels lie on one side of zero for the non-negative tensors that
    are most of a network's activations), instead of ORT's fixed 128. A grid finer than the
    histogram keeps the observed range.

    For a non-negative tensor the bin at zero is left out of the divergence: its values (a
    ReLU's zeros, often most of the tensor) sit on the grid's zero point. Counted, their spike,
    spread over the bins it is merged with, made the search clip: a ReLU of a Gaussian at
    2.4 standard deviations at 8 bits, and less at fewer bits (without the spike: its
    maximum, 4.7, at 8 bits, 4.1 at 4)."""
    levels = spec.levels[1] - spec.levels[0] + 1
    merged = levels if spec.symmetric else 2 * levels
    if merged > hist.size // 2:
        return TensorData(lowest=np.float32(min(low, 0.0)), highest=np.float32(max(high, 0.0)))
    if low >= 0:
        hist = hist.copy()
        hist[min(int(np.searchsorted(edges, 0.0, side="right")) - 1, hist.size - 1)] = 0
    lowest, highest = _entropy_threshold(hist, edges, np.float32(low), np.float32(high), merged)
    return TensorData(lowest=np.float32(min(float(lowest), 0.0)), highest=np.float32(max(float(highest), 0.0)))


def _entropy_threshold(hist: np.ndarray, edges: np.ndarray, low, high, quantized: int) -> tuple:
    """ONNX Runtime's KL search (``HistogramCollector.get_entropy_threshold``), value for value,
    with its per-bin Python loops and sums written as array operations: windows of 2i + 1 bins
    about the middle one, the outliers added to the end bins (p), merged into ``quantized``
    bins, each spread evenly (truncated to an integer, as ORT does) over the window's non-empty
    bins of it (q; a remainder of fewer than ``quantized`` bins counts in the last merged bin
    and is spread nowhere); both smoothed; the first window of least divergence, clamped to the
    observed range. ORT's loops took ~1 s per tensor at 8 bits on a 2-core CPU."""
    size = hist.size
    middle, half = size // 2, quantized // 2
    divergences = np.zeros(middle - half + 1)
    windows = []
    below = np.concatenate([[0], np.cumsum(hist)])  # counts before each bin (integers: exact)
    for i in range(half, middle + 1):
        start, end = middle - i, min(middle + i + 1, size)
        windows.append((edges[start], edges[end]))
        sliced = hist[start:end]
        p = sliced.copy()
        p[0] += below[start]
        p[-1] += below[size] - below[end]
        merged = sliced.size // quantized
        whole = quantized * merged
        bins = sliced[:whole].reshape(quantized, merged).sum(axis=1)
        bins[-1] += sliced[whole:].sum()
        filled = (p[:whole] != 0).reshape(quantized, merged).sum(axis=1)
        q = np.zeros(p.size, dtype=np.int64)
        q[:whole] = np.repeat(np.where(filled != 0, bins / np.maximum(filled, 1), 0), merged)
        p, q = smooth_distribution(p), smooth_distribution(q)
        divergences[i - half] = np.inf if p is None or q is None else np.array(kl_divergence(p, q), dtype=edges.dtype)
    lowest, highest = windows[int(np.argmin(divergences))]
    return (low if lowest < low else lowest), (high if highest > high else highest)


def mse_range(hist: np.ndarray, edges: np.ndarray, low: float, high: float, spec: BitSpec, steps: int = 40) -> TensorData:
    """The clipping range that minimises the expected squared quantization error.

    Error of a value x for a grid on [a, b] with step Δ: (x − a)² below a, (x − b)² above
    b, and Δ²/12 (uniform rounding) inside. Candidates shrink the observed range: one
    factor for symmetric grids, a grid of (lower, upper) factors otherwise; the first of
    equal errors wins, lower factor before upper.

    The three terms are summed apart: what lies below a depends on a alone and what lies
    above b on b alone, so each is one (factors × bins) product, and the count inside is
    what neither holds. 1,600 candidates of a 2048-bin histogram cost two 40 × 2048
    products, not 1,600 passes over the bins (EfficientNet-Lite0's activations: 5 s on a
    2-core CPU before).
    """
    centres = 0.5 * (edges[:-1] + edges[1:])
    counts = hist.astype(np.float64)
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    levels = spec.levels[1] - spec.levels[0]
    factors = np.linspace(1.0 / steps, 1.0, steps)
    if spec.symmetric:
        top = max(abs(low), abs(high))
        los, his = -top * factors, top * factors  # the pairs (los[i], his[i])
    else:
        los, his = low * factors, high * factors  # every pair (los[i], his[j])
    below = centres[None, :] < los[:, None]  # (candidates, bins)
    above = centres[None, :] > his[:, None]
    clipped_low = np.where(below, (centres[None, :] - los[:, None]) ** 2, 0.0) @ counts
    clipped_high = np.where(above, (centres[None, :] - his[:, None]) ** 2, 0.0) @ counts
    count_low, count_high = below @ counts, above @ counts
    if spec.symmetric:
        width = his - los
        error = clipped_low + clipped_high + (width / levels) ** 2 / 12 * (counts.sum() - count_low - count_high)
    else:
        width = his[None, :] - los[:, None]
        inside = counts.sum() - count_low[:, None] - count_high[None, :]
        error = clipped_low[:, None] + clipped_high[None, :] + (width / levels) ** 2 / 12 * inside
    error = np.where((width > 0) & ~np.isnan(error), error, np.inf).reshape(-1)  # as before: NaN never wins
    if not np.isfinite(error).any():
        return TensorData(lowest=np.float32(low), highest=np.float32(high))
    best = int(np.argmin(error))
    if spec.symmetric:
        lo, hi = los[best], his[best]
    else:
        lo, hi = los[best // steps], his[best % steps]
    return TensorData(lowest=np.float32(lo), highest=np.float32(hi))


def share_pool_ranges(model: onnx.ModelProto, ranges: TensorsData) -> tuple[TensorsData, list[str]]:
    """Give every averaging pool's output (and the reshapes of it) its input's range.

    A mean lies within its inputs' range, so this range never clips. The calibrated one can:
    synthetic images match the BN statistics channel by channel but are rarely as confident
    as real ones, whose pooled features reach several times higher (ResNet-20: 1.39 on DSG
    samples, 4.54 on real images) and are clipped on the narrow grid. TFLite requires the
    same of AVERAGE_POOL_2D. Returns the new ranges and the tensors changed.
    """
    values = dict(ranges.items())
    changed = []
    for node in model.graph.node:
        if node.op_type in _AVERAGING and node.input[0] in values and node.output[0] in values:
            shared = values[node.input[0]]
            tensors = [node.output[0]]
            for tensor in tensors:  # grows as reshapes of the pooled tensor are found
                values[tensor] = shared
                tensors += [n.output[0] for n in model.graph.node
                            if n.op_type in _SAME_VALUES and n.input[0] == tensor and n.output[0] in values]
            changed += tensors
    return TensorsData(ranges.calibration_method, values), changed
