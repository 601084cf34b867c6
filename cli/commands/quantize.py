"""``dsgonnx quantize MODEL``: QDQ model calibrated on synthetic (or real) data."""

from __future__ import annotations

import json

import click

from dsgonnx.errors import DataError
from dsgonnx.graph.onnx_io import parse_input_shape
from dsgonnx.preprocess import preprocess_from_preset
from dsgonnx_cli.options import PREPROCESS_HELP, input_shape_option, preprocess_options, recipe_given

_EPILOG = """\b
Bits: 8 -> int8/uint8, 4 -> INT4/UINT4 (opset 21), 16 -> int16/uint16,
2/3/5/6/7 -> simulated exactly in 8-bit containers (reported as simulated).
Targets: cpu = uint8 activations + int8 per-channel weights (reduce_range on
CPUs without VNNI); gpu/trt = symmetric int8 (trt: 8 bits only).
Calibration: dsg (default), zeroq, gaussian, or real data: an image folder
or an .npz with 'images' (also a set written by dsgonnx synthesize).
Logits: by default the classifier's output stays float (a range learned on
synthetic data clips real logits into ties); --logits exclude keeps the
whole last layer float, --logits quantize quantizes it too.
Refine: --refine brecq (blocks between residual joins, with QDrop) or
adaround (layer by layer) learns the weight rounding on the calibration
data; the QDQ model holds exactly the learned integers. W4A4 needs it.
\b
Exit status: 0 written (and gate held), 1 gate failed (model and report are
written), 2 bad input (nothing written).
\b
""" + PREPROCESS_HELP


def _bits(w8a8, w6a6, w4a4, wbits, abits):
    presets = [b for b, flag in ((8, w8a8), (6, w6a6), (4, w4a4)) if flag]
    if len(presets) > 1 or (presets and (wbits or abits)):
        raise DataError("give one of --w8a8, --w6a6, --w4a4, or --wbits/--abits")
    if presets:
        return presets[0], presets[0]
    return wbits or 8, abits or 8


@click.command("quantize", epilog=_EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model [default: <stem>.w8a8.onnx beside MODEL].")
@click.option("--w8a8", is_flag=True, help="8-bit weights and activations (default).")
@click.option("--w6a6", is_flag=True, help="6-bit weights and activations (simulated).")
@click.option("--w4a4", is_flag=True, help="4-bit weights and activations (INT4/UINT4).")
@click.option("--wbits", type=int, help="Weight bits (2-8 or 16).")
@click.option("--abits", type=int, help="Activation bits (2-8 or 16).")
@click.option("--calib", default="dsg", show_default=True, help="dsg | zeroq | gaussian | image folder | .npz")
@click.option("--num-samples", type=int, default=64, show_default=True, help="Calibration samples.")
@click.option("--iters", type=int, help="Synthesis iterations [default: 500 on CUDA; on CPU 100, the first 75 at 128 px for inputs >= 160 px].")
@click.option("--lr", type=float, help="Synthesis learning rate.")
@click.option("--slack-reading", help="DSG margin reading (see dsgonnx synthesize --help).")
@click.option("--low-res", type=int, help="Synthesis resolution schedule: start at NxN pixels.")
@click.option("--refine", type=click.Choice(["adaround", "brecq"]),
              help="Learn the weight rounding on the calibration data: adaround (layer by layer) or brecq "
                   "(blocks between residual joins, with QDrop).")
@click.option("--refine-iters", type=int, help="Refinement iterations per layer/block [default: 2000 on CUDA, 500 on CPU].")
@click.option("--refine-lr", type=float, help="Refinement learning rate (Adam on the rounding variables).")
@click.option("--refine-reg", type=float, help="Weight of AdaRound's rounding regulariser.")
@click.option("--refine-drop", type=float, help="QDrop probability of keeping an activation float while refining.")
@click.option("--refine-batch-size", type=int, help="Refinement batch size.")
@click.option("--calibrator", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax", show_default=True)
@click.option("--target", type=click.Choice(["cpu", "gpu", "trt"]), default="cpu", show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Keep this node in float (repeatable).")
@click.option("--logits", type=click.Choice(["exclude", "float", "quantize"]), default="exclude", show_default=True)
@input_shape_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="Synthesis device.")
@preprocess_options
@click.option("--val-data", type=click.Path(), help="Labelled images to validate on (calibration files are left out).")
@click.option("--holdout", type=int, default=16, show_default=True, help="Extra synthetic samples to validate on without --val-data.")
@click.option("--max-drop", type=float, help="Exit 1 when top-1 drops by more than this many points.")
@click.option("--min-agreement", type=float, help="Exit 1 when top-1 agreement falls below this fraction.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True, help="Validation provider.")
@click.option("--no-validate", is_flag=True, help="Skip the validation step.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def quantize_cmd(model, output, w8a8, w6a6, w4a4, wbits, abits, calib, num_samples, iters, lr, slack_reading, low_res,
                 refine, refine_iters, refine_lr, refine_reg, refine_drop, refine_batch_size, calibrator,
                 target, per_channel, exclude, logits, input_shape, seed, device, recipe, val_data, holdout, max_drop,
                 min_agreement, report, provider, no_validate, force, quiet):
    """Quantize MODEL to a QuantizeLinear/DequantizeLinear ONNX model."""
    from dsgonnx.pipeline import default_iters, quantize
    from dsgonnx.quant import QuantConfig

    w, a = _bits(w8a8, w6a6, w4a4, wbits, abits)
    synth = {key: value for key, value in (("lr", lr), ("slack_reading", slack_reading), ("low_res", low_res))
             if value is not None}
    refine_options = {key: value for key, value in (
        ("iters", refine_iters), ("lr", refine_lr), ("reg_weight", refine_reg), ("drop_prob", refine_drop),
        ("batch_size", refine_batch_size)) if value is not None}
    if refine_options and not refine:
        raise DataError("--refine-* options need --refine adaround|brecq")
    config = QuantConfig(
        wbits=w, abits=a, calib=calib, num_samples=num_samples, iters=iters if iters is not None else default_iters(device),
        iters_by_device=iters is None,
        calibrator=calibrator, target=target, per_channel=per_channel, exclude=tuple(exclude), logits=logits,
        seed=seed, device=device, preprocess=preprocess_from_preset(recipe[0], **recipe[1]) if recipe_given(recipe) else None,
        input_shape=parse_input_shape(input_shape) if input_shape else None, output=output, force=force,
        validate=not no_validate, val_data=val_data, holdout=holdout, max_drop=max_drop, min_agreement=min_agreement,
        report=report, provider=provider, quiet=quiet, synth=synth, refine=refine, refine_options=refine_options,
    )
    result = quantize(model, config)
    summary = {"output": str(result.output), "bits": result.bits, "calibration": result.calibration,
               "decisions": result.decisions, "timings": result.timings}
    if result.refine is not None:
        summary["refine"] = result.refine
    if result.report is not None:
        data = result.report.to_dict()
        summary["validation"] = {key: data.get(key) for key in ("fp32", "quantized", "drop_top1", "agreement", "sqnr_db")}
    click.echo(json.dumps(summary, indent=2, default=str))
