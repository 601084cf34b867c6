"""``dsgonnx inspect``: what a model is, whether it converts, and its BN layers."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from .config import SynthConfig
from .graph.onnx_io import load_model
from .graph.to_torch import check_parity, to_torch
from .graph.bn_taps import bn_folded, find_bn_layers, stateless_norms


def inspect_model(
    path: str | os.PathLike,
    input_shape: Optional[tuple[int, int, int, int]] = None,
    parity_samples: int = 4,
) -> dict[str, Any]:
    """Load, convert and parity-check ``path``; return a JSON-ready description.

    Keys: ``file``, ``sha256``, ``opset``, ``ir_version`` (the file's; ``ir_version_read_as`` where
    it is newer than ONNX Runtime reads), ``producer``, ``input``
    {``name``, ``shape`` (batch ``null`` when dynamic), ``dtype``, ``layout``},
    ``outputs``, ``num_classes`` (values per sample), ``head``, ``op_histogram``, ``bn_count``, ``bn_layers``
    [{``name``, ``channels``, ``eps``, ``kind``: batchnorm | decomposed | decomposed-mean}], ``bn_folded``,
    ``other_norms`` (normalisation ops without running statistics, e.g. LayerNormalization), ``torch_parity``
    {``max_abs_diff``, ``tolerance``, ``top1_agreement``, ``samples``, ``worst_output``},
    ``seconds``.
    """
    start = time.perf_counter()
    loaded = load_model(path, input_shape)
    torch_model = to_torch(loaded)
    parity = check_parity(torch_model, samples=parity_samples)
    layers = find_bn_layers(torch_model)
    # what the model really outputs (the parity run's): a declared output shape can be wrong,
    # ORT does not check it
    num_classes = parity.classes
    declared = {} if loaded.num_classes in (None, num_classes) else {"declared_num_classes": loaded.num_classes}
    return {
        "file": str(loaded.source),
        "sha256": loaded.sha256,
        "opset": loaded.opset,
        "ir_version": loaded.file_ir_version or loaded.model.ir_version,
        # (a file newer than ONNX Runtime reads is worked on at the newest IR it does)
        **({"ir_version_read_as": loaded.model.ir_version} if loaded.file_ir_version else {}),
        "producer": loaded.producer,
        "input": {
            "name": loaded.input.name,
            "shape": list(loaded.input.shape) if loaded.layout == "NCHW" else
            [loaded.input.shape[i] for i in (0, 2, 3, 1)],
            "dtype": str(loaded.file_dtype if loaded.file_dtype is not None else loaded.input.dtype),
            "layout": loaded.layout,
        },
        "outputs": loaded.output_names,
        "num_classes": num_classes,
        # one output per sample is a binary head: validation scores it as two classes
        "head": "binary (one output)" if num_classes == 1 else "binary (two outputs)" if num_classes == 2 else "multi-class",
        **declared,
        "op_histogram": loaded.op_histogram,
        "bn_count": len(layers),
        "bn_layers": [{"name": l.name, "channels": l.channels, "eps": l.eps, "kind": l.kind} for l in layers],
        "bn_folded": not layers and bn_folded(loaded.model),
        "other_norms": stateless_norms(loaded.model),
        # what ``quantize`` (``--calib auto``, the default) calibrates on, and why
        "calibration": _calibration_source(bool(layers)),
        "torch_parity": {
            "max_abs_diff": parity.max_abs_diff,
            "tolerance": parity.tolerance,
            "top1_agreement": parity.top1_agreement,
            "samples": parity.samples,
            "worst_output": parity.worst_output,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """A readable multi-line summary of :func:`inspect_model`'s result."""
    shape = "x".join("N" if d is None else str(d) for d in info["input"]["shape"])
    parity = info["torch_parity"]
    lines = [
        f"model        {info['file']}",
        f"opset        {info['opset']} (IR {info['ir_version']}"
        + (f", read as IR {info['ir_version_read_as']}" if "ir_version_read_as" in info else "")
        + f", producer {info['producer'] or 'unknown'})",
        f"input        {info['input']['name']}: {shape} {info['input']['dtype']} {info['input']['layout']}"
        + (" (worked on channels-first; quantized models keep NHWC)" if info["input"]["layout"] == "NHWC" else ""),
        f"classes      {info['num_classes']}{' — a binary head, scored as two classes' if info['num_classes'] == 1 else ''}"
        f" (outputs: {', '.join(info['outputs'])}"
        f"{'; the graph declares ' + str(info['declared_num_classes']) if 'declared_num_classes' in info else ''})",
        "ops          " + ", ".join(f"{op} {n}" for op, n in sorted(info["op_histogram"].items(), key=lambda kv: -kv[1])),
    ]
    if info["bn_count"]:
        lines.append(f"batchnorm    {info['bn_count']} layers")
        width = max(len(layer["name"]) for layer in info["bn_layers"])
        kinds = {"batchnorm": "", "decomposed": "  decomposed (Sub/Div): mean and variance",
                 "decomposed-mean": "  decomposed (Sub/Mul): mean only"}
        lines += [f"  {layer['name']:<{width}}  {layer['channels']:>5} ch{kinds[layer['kind']]}"
                  for layer in info["bn_layers"]]
    elif info["bn_folded"]:
        lines.append("batchnorm    none: Conv layers carry biases, BN was likely folded into Conv (bn_folded)")
    elif info["other_norms"]:
        lines.append(f"batchnorm    none: normalised by {', '.join(info['other_norms'])} (no running statistics)")
    else:
        lines.append("batchnorm    none")
    calibration = info["calibration"]
    lines.append(f"calibration  quantize's default (--calib auto) synthesizes {calibration['method']}: "
                 f"{calibration['why']}")
    lines.append(
        f"torch parity max |diff| {parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:.3g}), "
        f"top-1 agreement {parity['top1_agreement']:.0%} on {parity['samples']} random inputs"
    )
    return "\n".join(lines)


def _calibration_source(has_bn: bool) -> dict[str, str]:
    config, why = SynthConfig().for_model(has_bn)
    return {"method": config.method.value, "why": why}
