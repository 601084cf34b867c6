"""Per-tensor errors of a QDQ model against its float original (``validate --per-tensor``).

For every activation the QDQ model quantizes (:func:`dsgonnx.quant.placement.read_placement`:
the model input, layer inputs and outputs, residual joins, pooling...), on the samples
validated:

- ``sqnr_db``: the quantized model's value there (its DequantizeLinear output) against the
  float model's tensor of the same name: the error carried to this point;
- ``grid_sqnr_db``: the float model's own tensor put on this tensor's grid: the error the
  grid adds by itself (a step too coarse, or a range too narrow);
- ``clipped``: the share of the float values outside the grid's range.

Where ``sqnr_db`` falls well below ``grid_sqnr_db`` the error came from upstream; where
``grid_sqnr_db`` is low the grid costs it, and ``clipped`` says whether its range does. So it
tells a tensor whose range the calibration images set badly (data) from error that grows
through the layers (rounding, reconstruction).

The quantized model runs as written (no fused integer kernels, so that its DequantizeLinear
outputs exist), the float model as ONNX Runtime optimizes it, both on the CPU; sums in
float64 over every sample.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dsgonnx.errors import DsgonnxError
from dsgonnx.quant.placement import Grid, Placement, read_placement
from dsgonnx.validation.metrics import finite_or_none, sqnr_from_sums
from dsgonnx.runtime import CPU, ort_session, run_model

BATCH = 8  # samples per call: every quantized tensor of the batch is held at once


@dataclass(frozen=True)
class TensorError:
    """One quantized activation, measured over the samples (dB: 10·log10(Σ f² / Σ error²))."""

    tensor: str
    sqnr_db: float | None  # the quantized model's value against the float one; inf where equal, None: not finite
    grid_sqnr_db: float | None  # the float tensor on this grid alone
    clipped: float  # share of the float values outside the grid's range

    def to_dict(self) -> dict:
        return {"tensor": self.tensor, "sqnr_db": finite_or_none(self.sqnr_db),
                "grid_sqnr_db": finite_or_none(self.grid_sqnr_db), "clipped": self.clipped}


@dataclass(frozen=True)
class PerTensor:
    """Every quantized activation the float model has a tensor of the same name for, in the
    float model's order; ``unmatched``: those it has none for (renamed or fused away)."""

    num_samples: int
    tensors: tuple[TensorError, ...]
    unmatched: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"num_samples": self.num_samples, "arithmetic": "exact",
                "tensors": [t.to_dict() for t in self.tensors], "unmatched": list(self.unmatched)}

    def table(self) -> str:
        width = min(60, max([len("tensor")] + [len(t.tensor) for t in self.tensors]))
        rows = [f"  per tensor ({self.num_samples} samples; the QDQ graph as written): quantized model vs fp32, "
                "the fp32 tensor on its grid alone, share of it clipped",
                f"  {'tensor':<{width}}{'SQNR dB':>10}{'grid dB':>10}{'clipped':>10}"]
        for t in self.tensors:
            name = t.tensor if len(t.tensor) <= width else "…" + t.tensor[-(width - 1):]
            rows.append(f"  {name:<{width}}{_db(t.sqnr_db):>10}{_db(t.grid_sqnr_db):>10}{100 * t.clipped:>9.2f}%")
        if self.unmatched:
            rows.append(f"  not in the fp32 model ({len(self.unmatched)}): {', '.join(self.unmatched)}")
        return "\n".join(rows)


@dataclass(frozen=True)
class QuantizedActivations:
    """A QDQ model as read once (``model``) and what it quantizes (``placement``)."""

    path: str
    model: onnx.ModelProto
    placement: Placement


def read_quantized_activations(q_path: str) -> QuantizedActivations:
    """``q_path`` read, with its QDQ placement; :class:`DsgonnxError` (exit 2) where it quantizes no activation."""
    model = onnx.load(q_path)
    placement = read_placement(model)
    if not placement.activations:
        raise DsgonnxError(f"{q_path}: no activation is quantized (no QuantizeLinear -> DequantizeLinear pair); "
                           "--per-tensor compares a QDQ model's quantized activations")
    return QuantizedActivations(q_path, model, placement)


def per_tensor_errors(fp_path: str, quantized: QuantizedActivations, dataset, fixed_batch: int | None) -> PerTensor:
    """Run both models on every sample of ``dataset`` (:class:`~dsgonnx.validation.data.Dataset`)
    with the quantized activations as outputs and accumulate each one's errors (``quantized.model``
    is given those outputs and saved with its weights outside it: it is spent afterwards)."""
    q_path, placement = quantized.path, quantized.placement
    fp_model = onnx.load(fp_path)
    graph_inputs = {i.name for i in fp_model.graph.input}
    names = list(graph_inputs) + [out for node in fp_model.graph.node for out in node.output if out]
    position = {name: index for index, name in reversed(list(enumerate(names)))}
    matched = sorted((t for t in placement.activations if t in position), key=position.__getitem__)
    unmatched = tuple(sorted(t for t in placement.activations if t not in position))
    fp_outputs = [t for t in matched if t not in graph_inputs]
    q_outputs = [placement.dequantized[t] for t in matched]
    sums = {t: np.zeros(5) for t in matched}  # Σ f², Σ (f − q)², Σ (f − grid(f))², clipped, values
    with tempfile.TemporaryDirectory(prefix="dsgonnx-per-tensor-") as scratch:
        fp_session = ort_session(_with_outputs(fp_model, fp_outputs, Path(scratch) / "fp.onnx"), [CPU])
        q_session = ort_session(_with_outputs(quantized.model, q_outputs, Path(scratch) / "q.onnx"), [CPU],
                                as_written=True)
        input_name = fp_session.get_inputs()[0].name
        batch_size = fixed_batch or min(BATCH, dataset.size)
        for start in range(0, dataset.size, batch_size):
            count = min(batch_size, dataset.size - start)
            batch = dataset.batch(start, start + count)
            if fixed_batch and count < batch_size:
                batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
            fp_values = dict(zip(fp_outputs, run_model(fp_session, {input_name: batch}, fp_path, fp_outputs)))
            q_values = run_model(q_session, {input_name: batch}, q_path, q_outputs)
            for tensor, q_value in zip(matched, q_values):
                f = (batch if tensor in graph_inputs else fp_values[tensor])[:count].astype(np.float64)
                q = np.asarray(q_value)[:count].astype(np.float64)
                if f.shape != q.shape:
                    raise DsgonnxError(f"{tensor!r} is {f.shape} in {fp_path} but {q.shape} in {q_path}: "
                                       "not the same model")
                on_grid, clipped = _on_grid(f, placement.activations[tensor])
                sums[tensor] += (np.square(f).sum(), np.square(f - q).sum(), np.square(f - on_grid).sum(), clipped,
                                 f.size)
    tensors = tuple(TensorError(t, sqnr_from_sums(s[0], s[1]), sqnr_from_sums(s[0], s[2]),
                                float(s[3] / s[4]) if s[4] else 0.0)
                    for t, s in sums.items())
    return PerTensor(num_samples=dataset.size, tensors=tensors, unmatched=unmatched)


def _with_outputs(model: onnx.ModelProto, outputs: list[str], path: Path) -> Path:
    """``model`` with ``outputs`` as its graph outputs too, saved at ``path`` (weights beside it)."""
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs if name not in have)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def _on_grid(values: np.ndarray, grid: Grid) -> tuple[np.ndarray, int]:
    """QuantizeLinear then DequantizeLinear on ``grid`` (ties to even, as ONNX rounds), and how
    many values the grid's range clips."""
    levels = np.rint(values / grid.scale) + grid.zero_point
    clipped = int(np.count_nonzero((levels < grid.low) | (levels > grid.high)))
    return (np.clip(levels, grid.low, grid.high) - grid.zero_point) * grid.scale, clipped


def _db(value: float | None) -> str:
    return "-" if value is None else "inf" if value == math.inf else f"{value:.2f}" if math.isfinite(value) else "-"
