"""``analyze``: which quantized tensors cost the accuracy, one at a time.

The model is quantized exactly as ``quantize`` would (same config), then every tensor the QDQ
model quantizes — the model input, each activation ORT put a QuantizeLinear on, each weight
(with its layer's bias) — is measured twice on evaluation samples, against the float model:

* ``alone``: only this tensor quantized, everything else float — the damage it does by itself;
* ``all_but``: everything quantized except this tensor — what keeping it float would win back.

Both are edits of the one QDQ model (a tensor is "float" when its QuantizeLinear/
DequantizeLinear pair is bypassed, or its weight and bias are the float ones), so the figures
describe the model ``quantize`` exports. The samples are the user's labelled data (top-1 too)
or, data-free, held-out synthetic samples. Metrics: output SQNR (dB) and top-1 agreement
with the float model.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import numpy_helper

from .calibration_data import held_out_name, holds_out
from .config import QuantConfig
from .errors import DataError, ModelLoadError, UnsupportedModelError
from .progress import Progress, say
from .runtime import KEEP_FLOAT_WEIGHTS, one_line, ort_session

_SIMULATION = ("Clip",)  # what may sit between QuantizeLinear and DequantizeLinear (simulated bits)


@dataclass
class QuantPoint:
    """One quantized tensor of a QDQ model and how to make it float again."""

    name: str  # the float tensor (activation) or the weight initializer
    kind: str  # "activation" | "weight"
    layer: Optional[str]  # the Conv/Gemm a weight feeds
    dq_outputs: list[str]  # DequantizeLinear outputs that stand for the tensor
    elements: int = 0  # weight values (0 for activations)


@dataclass
class Sensitivity:
    tensor: str
    kind: str
    layer: Optional[str]
    elements: int
    alone: dict = field(default_factory=dict)  # sqnr_db, agreement, top1 with only this tensor quantized
    all_but: dict = field(default_factory=dict)  # the same with only this tensor float


def quant_points(qdq: onnx.ModelProto) -> list[QuantPoint]:
    """Every quantized activation and weight of a QDQ model, in graph order."""
    producers = {out: node for node in qdq.graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in qdq.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {t.name: t for t in qdq.graph.initializer}
    points: dict[str, QuantPoint] = {}
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = producers.get(node.input[0])
        while source is not None and source.op_type in _SIMULATION:
            source = producers.get(source.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            tensor = source.input[0]
            point = points.setdefault(tensor, QuantPoint(tensor, "activation", None, []))
            point.dq_outputs.append(node.output[0])
        elif node.input[0] in inits and inits[node.input[0]].data_type != onnx.TensorProto.INT32:
            users = consumers.get(node.output[0], [])
            layer = users[0] if users and users[0].op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") else None
            if layer is None or layer.input[1] != node.output[0]:
                continue
            tensor = node.input[0]
            points[tensor] = QuantPoint(tensor, "weight", layer.name, [node.output[0]],
                                        int(np.prod(inits[tensor].dims)))
    return list(points.values())


@dataclass
class FloatParts:
    """What the float model has that the QDQ model folded away: each layer's float weight and
    bias, and the activations ORT dropped because the quantized range implies them (a Relu or
    ReLU6 right after a Conv disappears: uint8 with zero point 0 clamps at 0)."""

    layers: dict  # layer name -> (weight TensorProto, bias TensorProto or None)
    activations: dict  # tensor -> (the float model's Relu/Clip node, its constant inputs)


def float_parts(float_model: onnx.ModelProto, qdq: onnx.ModelProto) -> FloatParts:
    inits = {t.name: t for t in float_model.graph.initializer}
    layers = {}
    for node in float_model.graph.node:
        if len(node.input) > 1 and node.input[1] in inits:
            bias = inits.get(node.input[2]) if len(node.input) > 2 else None
            layers[node.name] = (inits[node.input[1]], bias)
    qdq_producers = {out: node.op_type for node in qdq.graph.node for out in node.output}
    activations = {}
    for node in float_model.graph.node:
        if node.op_type in ("Relu", "Clip") and qdq_producers.get(node.output[0], node.op_type) != node.op_type:
            activations[node.output[0]] = (node, [inits[name] for name in node.input[1:] if name in inits])
    return FloatParts(layers, activations)


def with_float(qdq: onnx.ModelProto, points: list[QuantPoint], parts: FloatParts) -> onnx.ModelProto:
    """A copy of ``qdq`` in which ``points`` are float: consumers of their dequantized values
    read the float tensor (activations, with the activation ORT folded into the range put
    back) or the float weight and bias (weights)."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    rewire: dict[str, str] = {}
    layers = {node.name: node for node in model.graph.node}
    producers = {out: node for node in model.graph.node for out in node.output}
    added = {t.name for t in model.graph.initializer}
    for point in points:
        if point.kind == "activation":
            rewire.update({out: point.name for out in point.dq_outputs})
            if point.name in parts.activations:
                act, constants = parts.activations[point.name]
                before = f"{point.name}_dsgonnx_before_activation"
                producer = producers[point.name]
                producer.output[list(producer.output).index(point.name)] = before
                restored = onnx.NodeProto()
                restored.CopyFrom(act)
                restored.input[0] = before
                model.graph.node.append(restored)
                model.graph.initializer.extend(c for c in constants if c.name not in added)
                added.update(c.name for c in constants)
            continue
        weight, bias = parts.layers[point.layer]
        w_name, b_name = f"{point.name}_dsgonnx_float", f"{point.layer}_dsgonnx_float_bias"
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(weight), w_name))
        rewire[point.dq_outputs[0]] = w_name
        node = layers[point.layer]
        if bias is not None and len(node.input) > 2 and node.input[2]:
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(bias), b_name))
            node.input[2] = b_name
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in rewire:
                node.input[index] = rewire[name]
    return _sorted(model)


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (restored activations were appended at the end)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise UnsupportedModelError("analyze: the edited QDQ graph has a cycle")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def _outputs(path, input_name: str, images: np.ndarray, batch: int, exact: bool = False) -> np.ndarray:
    """The classifier output (N×classes) of the model at ``path`` on ``images``, in batches.
    Weights made float stay float (ORT would quantize them again, per tensor). ``exact``: the
    graph as written (no fused integer kernels; see ``ValidateConfig.exact``)."""
    from .validation.sessions import flatten_classifier_output

    session = ort_session(path, disabled_optimizers=KEEP_FLOAT_WEIGHTS, as_written=exact)
    output = session.get_outputs()[0].name
    return np.concatenate([
        flatten_classifier_output(np.asarray(session.run([output], {input_name: images[i : i + batch]})[0]), str(path))
        for i in range(0, len(images), batch)])


def _score(model: onnx.ModelProto, input_name: str, images: np.ndarray, reference: np.ndarray, labels, batch: int,
           scratch: Path, exact: bool = False) -> dict:
    from .validation.metrics import compare_outputs, finite_or_none

    path = scratch / "probe.onnx"
    onnx.save(model, str(path))
    metrics = compare_outputs(reference, _outputs(path, input_name, images, batch, exact), labels)
    scores = {"sqnr_db": finite_or_none(metrics.sqnr_db, 3),
              "agreement": round(metrics.agreement, 4)}
    if labels is not None:
        scores["top1"] = round(metrics.q_top1, 3)
    return scores


@dataclass
class AnalysisReport:
    """Per-tensor sensitivity of one quantization setting."""

    model: str
    bits: dict
    samples: dict  # {"source": ..., "count": ...}
    full: dict  # everything quantized
    fp32: dict  # the float model's top-1 when labelled
    tensors: list[Sensitivity]
    seconds: float = 0.0

    def ranked(self, by: str = "alone") -> list[Sensitivity]:
        """Most damaging first: lowest SQNR when quantized alone (``alone``) or highest gain
        when kept float (``all_but``)."""
        if by == "alone":
            return sorted(self.tensors, key=lambda t: (t.alone.get("sqnr_db") is None, t.alone.get("sqnr_db") or 0.0))
        return sorted(self.tensors, key=lambda t: -(t.all_but.get("sqnr_db") or -np.inf))

    def to_dict(self) -> dict:
        return {"model": self.model, "bits": self.bits, "samples": self.samples, "fp32": self.fp32,
                "all_quantized": self.full, "seconds": self.seconds,
                "tensors": [vars(t) for t in self.ranked()]}

    def table(self, rows: int = 25) -> str:
        has_top1 = "top1" in self.full
        head = f"{'tensor':<48} {'kind':<10} {'alone dB':>9} {'alone agr':>9} {'float-it dB':>11}"
        head += f" {'float-it top1':>13}" if has_top1 else ""
        lines = [f"all quantized: SQNR {self.full['sqnr_db']} dB, agreement {self.full['agreement']}"
                 + (f", top-1 {self.full['top1']} (fp32 {self.fp32.get('top1')})" if has_top1 else ""), head]
        for t in self.ranked()[:rows]:
            line = (f"{t.tensor[-48:]:<48} {t.kind:<10} {t.alone['sqnr_db']!s:>9} {t.alone['agreement']:>9} "
                    f"{t.all_but['sqnr_db']!s:>11}")
            lines.append(line + (f" {t.all_but['top1']:>13}" if has_top1 else ""))
        return "\n".join(lines)

    def save_chart(self, path, rows: int = 30) -> Path:
        """A PNG bar chart: the ``rows`` most damaging tensors, SQNR when quantized alone."""
        from PIL import Image, ImageDraw

        from .artifacts import write_atomically

        ranked = [t for t in self.ranked() if t.alone.get("sqnr_db") is not None][:rows]
        width, row_h, label_w = 1000, 22, 420
        image = Image.new("RGB", (width, 60 + row_h * max(len(ranked), 1)), "white")
        draw = ImageDraw.Draw(image)
        draw.text((10, 10), f"{Path(self.model).name} {self.bits.get('tag', '')}: output SQNR (dB) with only this "
                            f"tensor quantized (shorter = more damage); all quantized: {self.full['sqnr_db']} dB",
                  fill="black")
        top = max((t.alone["sqnr_db"] for t in ranked), default=1.0) or 1.0
        for i, t in enumerate(ranked):
            y = 40 + i * row_h
            draw.text((10, y + 4), f"{t.kind[0].upper()} {t.tensor[-60:]}", fill="black")
            length = max(2, int((width - label_w - 80) * max(t.alone["sqnr_db"], 0) / top))
            draw.rectangle([label_w, y + 3, label_w + length, y + row_h - 3],
                           fill="#c0392b" if t.kind == "weight" else "#2e86c1")
            draw.text((label_w + length + 6, y + 4), f"{t.alone['sqnr_db']:.1f}", fill="black")
        path = Path(path)
        write_atomically(path, lambda handle: image.save(handle, format="PNG"))
        return path


_NO_SAMPLES = ("analyze without `data` measures on held-out samples and the calibration data holds none: it needs "
               "`data` (images to measure on), a set written by `dsgonnx synthesize --holdout N`, or calibration "
               "images with `holdout` more than `num_samples`")


def analyze(model, config: Optional[QuantConfig] = None, *, data=None, eval_samples: int = 256,
            report: Optional[str | os.PathLike] = None, chart: Optional[str | os.PathLike] = None,
            quantized: Optional[str | os.PathLike] = None, exact: bool = False) -> AnalysisReport:
    """Per-tensor sensitivity of ``model`` quantized as ``config`` says (``dsgonnx analyze``).

    ``data``: labelled images (folder or .npz) to measure on, the calibration files left out;
    without it, held-out samples (``config.holdout``, at least 16: synthesized beside the
    calibration images, a saved set's own when ``config.calib`` is one written with ``dsgonnx
    synthesize --holdout``, or images of a calibration folder or array not calibrated on).
    ``report`` / ``chart``: also write the JSON report / a PNG bar chart (atomically).
    ``quantized``: analyze this QDQ model of ``model`` (one dsgonnx quantize wrote, e.g. on
    another machine) instead of quantizing; ``config`` does not apply and ``data`` is needed.
    ``exact``: run every probe as written, without ORT's fused integer kernels (what a CPU whose
    int8 kernels cannot saturate computes; see ``ValidateConfig.exact``).
    """
    from .graph.layout import channels_first_input
    from .graph.normalize import float32_interface
    from .graph.onnx_io import any_batch, load_model, quantizable
    from .pipeline import quantize
    from .quant.qdq import pre_process
    from .validation.data import open_dataset

    started = time.perf_counter()
    config = config or QuantConfig()
    if not isinstance(eval_samples, int) or eval_samples < 1:
        raise DataError(f"`eval_samples` must be at least 1, got {eval_samples!r}")
    for path, suffix in ((report, ".json"), (chart, ".png")):
        if path is not None and Path(path).suffix.lower() != suffix:
            raise DataError(f"`{'report' if suffix == '.json' else 'chart'}` must be a {suffix} file, got {path}")
    loaded = quantizable(load_model(model, config.input_shape))  # (a float16 or old-opset file: its float32 twin)
    # (uint8 pixels the model normalises itself: 0-255 as they are; other inputs' recipe unchanged)
    config = replace(config, preprocess=loaded.preprocess_for(config.preprocess))
    if quantized is not None and data is None:
        raise DataError("analyze of a given quantized model needs `data` (images to measure on)")
    if quantized is None and data is None and not config.synthetic and not holds_out(
            config.calib, config.num_samples, max(config.holdout, 16), loaded.takes_pixels):
        raise DataError(_NO_SAMPLES)  # before quantizing, which may take long
    with tempfile.TemporaryDirectory(prefix="dsgonnx-analyze-") as scratch:
        scratch = Path(scratch)
        if quantized is not None:
            qdq, bits = _given_quantized(quantized, loaded)
            calibration_files = ()
        else:
            # (a saved set gives up to this many of its own held-out samples)
            holdout = max(config.holdout, 16) if data is None else 0
            # without data, quantize keeps its held-out samples (and checks the model on them)
            result = quantize(loaded, replace(config, output=str(scratch / "q.onnx"), force=True,
                                              validate=data is None, val_data=None, max_drop=None,
                                              min_agreement=None, report=None, holdout=holdout))
            qdq = onnx.load(str(result.output))
            bits = dict(result.bits, tag=f"W{config.wbits}A{config.abits}")
            calibration_files = result.calibration_files
        if loaded.layout == "NHWC":  # measured on NCHW arrays, as the float twin
            channels_first_input(qdq, loaded.input.name)
        if loaded.file_dtype is not None:  # float32 arrays, as the twin
            float32_interface(qdq, loaded.input.name)
        if loaded.file_batch is not None:  # batches of any size, as the twin
            any_batch(qdq)
        points = quant_points(qdq)
        if not points:
            raise UnsupportedModelError(f"{loaded.source.name}: the quantized model has no quantized tensors to analyze")
        floats = float_parts(onnx.load(str(pre_process(loaded.path, scratch / "prepared.onnx"))), qdq)
        if data is not None:
            # (a uint8 model's data as the file takes it: uint8 arrays, whole pixels from image files)
            spec = replace(loaded.input, dtype=loaded.file_dtype) if loaded.takes_pixels else loaded.input
            dataset = open_dataset(spec, os.fspath(data), config.preprocess, exclude_files=frozenset(calibration_files))
            rows = np.unique(np.linspace(0, dataset.size - 1, min(eval_samples, dataset.size)).astype(int))
            images = np.concatenate([dataset.batch(i, i + 1) for i in rows]).astype(np.float32)
            labels = dataset.labels[rows] if dataset.labels is not None else None
            samples = {"source": os.fspath(data), "count": len(images), "labelled": labels is not None}
        elif result.holdout is not None:
            images, labels = result.holdout[:eval_samples], None
            samples = {"source": held_out_name(result.calibration["method"]), "count": len(images), "labelled": False}
        else:
            raise DataError(_NO_SAMPLES)
        batch = loaded.input.fixed_batch or 32
        if loaded.input.fixed_batch:
            images = images[: len(images) - len(images) % batch] if len(images) >= batch else images
        reference = _outputs(loaded.path, loaded.input.name, images, batch)  # the float model
        from .validation.metrics import compare_outputs

        fp32 = {"top1": round(compare_outputs(reference, reference, labels).fp_top1, 3)} if labels is not None else {}
        full = _score(qdq, loaded.input.name, images, reference, labels, batch, scratch, exact)
        say(f"analyze: {len(points)} quantized tensors, {len(images)} samples ({samples['source']}); "
            f"all quantized: SQNR {full['sqnr_db']} dB, agreement {full['agreement']}")
        progress = Progress("analyze", len(points))
        tensors = []
        for number, point in enumerate(points, 1):
            others = [p for p in points if p is not point]
            tensors.append(Sensitivity(point.name, point.kind, point.layer, point.elements,
                                       alone=_score(with_float(qdq, others, floats), loaded.input.name, images,
                                                    reference, labels, batch, scratch, exact),
                                       all_but=_score(with_float(qdq, [point], floats), loaded.input.name, images,
                                                      reference, labels, batch, scratch, exact)))
            progress.update(number, point.name)
    analysis = AnalysisReport(str(loaded.source), bits, dict(samples, arithmetic="exact" if exact else "native"),
                              full, fp32, tensors, round(time.perf_counter() - started, 2))
    say(analysis.table())
    if report is not None:
        import json

        from .artifacts import write_atomically

        text = json.dumps(analysis.to_dict(), indent=2, default=str)
        write_atomically(Path(report), lambda handle: handle.write(text.encode()))
    if chart is not None:
        analysis.save_chart(chart)
    return analysis


def _given_quantized(path, loaded) -> tuple[onnx.ModelProto, dict]:
    """The QDQ model at ``path`` (made by dsgonnx quantize from ``loaded``'s file) and its bits
    as quantize stamped them."""
    import json

    try:
        qdq = onnx.load(os.fspath(path))
    except Exception as exc:  # a missing file, not ONNX, ...
        raise ModelLoadError(f"cannot load the quantized model {path}: {one_line(exc)}") from None
    meta = {p.key: p.value for p in qdq.metadata_props}
    if "dsgonnx.source_sha256" not in meta:
        raise UnsupportedModelError(f"{path} was not written by dsgonnx quantize (no dsgonnx metadata): analyze reads "
                                    "the QDQ layout quantize writes")
    if meta["dsgonnx.source_sha256"] != loaded.sha256:
        raise DataError(f"{path} was quantized from another model than {loaded.source.name} (source checksum differs)")
    bits = json.loads(meta.get("dsgonnx.bits", "{}"))
    return qdq, dict(bits, tag=f"W{bits.get('weights', '?')}A{bits.get('activations', '?')}", given=os.fspath(path))


def choose_8bit(qdq_path: Path, float_path: Path, input_name: str, images: np.ndarray, budget: float,
                batch: int, kept: Iterable[str] = ()) -> tuple[set[str], dict]:
    """Mixed precision: the tensors of the QDQ model at ``qdq_path`` that add the most noise to
    the output, kept on the 8-bit grid — weights by noise per value while their values fit in
    ``budget`` (a share of all quantized weight values), activations by noise up to the same
    share of the activation tensors. ``kept``: tensors (float names) that are on the 8-bit grid
    already (the first layer); they count against the budget. A tensor's noise is the output
    noise power (relative to the signal, 10^(−SQNR/10)) with only it quantized; noises of
    separate tensors add up to first order. Returns the names (in the float model) of the
    tensors above the low width, ``kept`` included, and a report."""
    qdq = onnx.load(str(qdq_path))
    points = quant_points(qdq)
    parts = float_parts(onnx.load(str(float_path)), qdq)
    reference = _outputs(float_path, input_name, images, batch)
    with tempfile.TemporaryDirectory(prefix="dsgonnx-mixed-") as scratch:
        full = _score(qdq, input_name, images, reference, None, batch, Path(scratch))["sqnr_db"]
        progress = Progress("mixed precision: sensitivity", len(points))
        noise = {}
        for number, point in enumerate(points, 1):
            others = [p for p in points if p is not point]
            sqnr = _score(with_float(qdq, others, parts), input_name, images, reference, None, batch,
                          Path(scratch))["sqnr_db"]
            noise[point.name] = 0.0 if sqnr is None or sqnr == float("inf") else 10 ** (-sqnr / 10)
            progress.update(number, point.name)
    total_noise = sum(noise.values()) or 1.0
    kept = set(kept)

    def float_name(point: QuantPoint) -> str:
        return parts.layers[point.layer][0].name if point.kind == "weight" else point.name

    weights = sorted((p for p in points if p.kind == "weight"), key=lambda p: -noise[p.name] / max(p.elements, 1))
    activations = sorted((p for p in points if p.kind == "activation"), key=lambda p: -noise[p.name])
    total = sum(p.elements for p in weights)
    already = [p for p in weights if float_name(p) in kept]
    allowance, used = budget * total, sum(p.elements for p in already)
    chosen = []
    for point in weights:
        if point not in already and noise[point.name] > 0 and used + point.elements <= allowance:
            used += point.elements
            chosen.append(point)
    fresh = [p for p in activations if p.name not in kept and noise[p.name] > 0]
    slots = max(int(math.floor(budget * len(activations))) - sum(p.name in kept for p in activations), 0)
    kept_weights, kept_activations = already + chosen, [p for p in activations if p.name in kept] + fresh[:slots]

    def rows(kept):
        return [{"tensor": float_name(p), "noise_share": round(noise[p.name] / total_noise, 4)} for p in kept]

    report = {"budget": budget, "weight_share_8bit": round(used / total, 4) if total else 0.0,
              "weights_8bit": rows(kept_weights), "activations_8bit": rows(kept_activations),
              "noise_share_kept": round(sum(noise[p.name] for p in kept_weights + kept_activations) / total_noise, 4),
              "uniform_sqnr_db": full, "probe_samples": len(images)}
    say(f"mixed precision: {len(kept_weights)} weights ({report['weight_share_8bit']:.1%} of the values) and "
        f"{len(kept_activations)} activations stay at 8 bits; they made {report['noise_share_kept']:.0%} of the "
        f"output noise")
    return {row["tensor"] for row in report["weights_8bit"] + report["activations_8bit"]}, report
