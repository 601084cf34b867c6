"""``dsgonnx validate``: compare an FP and a quantized model; exit 1 when the gate fails."""

from __future__ import annotations

import click

from dsgonnx.errors import DataError
from dsgonnx.preprocess import PRESETS, preprocess_from_preset
from dsgonnx.validate import DEFAULT_BATCH_SIZE, ValidateConfig, check_gate, validate

_EPILOG = """\b
Exit status: 0 validated (gate held), 1 gate failed, 2 bad input.
\b
Preprocessing (image folders): a preset, and explicit values that override it.
mean/std are in the units of the pixel scale (1: pixels 0-1, 255: 0-255),
listed in the model's channel order. The crop follows the model's input size.
  imagenet   RGB 0-1, mean 0.485,0.456,0.406 std 0.229,0.224,0.225, resize 256/crop 224
  inception  RGB 0-1, mean 0.5 std 0.5
  tf-lite    RGB 0-255, mean 127 std 128
  none       RGB 0-255, no normalisation, resize = crop
CIFAR-size models take their 32x32 images as they are: --resize 32 --crop 32.
\b
Data: a folder of class sub-folders (label = position of the folder name in the
sorted list; the number of folders must equal the model's classes unless
--classes is given), a flat folder of images (unlabelled), or an .npz with
'images' (preprocessed, model layout) and optional 'labels'.
"""


@click.command("validate", epilog=_EPILOG)
@click.argument("fp_model", type=click.Path(dir_okay=False))
@click.argument("q_model", type=click.Path(dir_okay=False))
@click.option("--data", "data", type=click.Path(), help="Image folder (class sub-folders or flat) or .npz file.")
@click.option("--preprocess", "preset", type=click.Choice(sorted(PRESETS), case_sensitive=False), help="Preprocessing preset [default: imagenet].")
@click.option("--resize", type=int, help="Resize the shorter side to N pixels (overrides the preset).")
@click.option("--crop", type=int, help="Centre crop N x N (default: the model's input size).")
@click.option("--mean", help="Per-channel mean, 'a,b,c' or one value.")
@click.option("--std", help="Per-channel std, 'a,b,c' or one value.")
@click.option("--channel-order", type=click.Choice(["rgb", "bgr"], case_sensitive=False), help="Channel order the model expects.")
@click.option("--pixel-scale", type=float, help="Pixel value of white before mean/std: 1 or 255.")
@click.option("--classes", "class_list", type=click.Path(), help="Text file: the model's class names in output order, one per line.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"], case_sensitive=False), default="auto", show_default=True, help="auto = CUDA when it really works, else CPU.")
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, help="Samples per inference call.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here (atomically).")
@click.option("--max-drop", type=float, help="Fail (exit 1) when top-1 drops by more than this many points.")
@click.option("--min-agreement", type=float, help="Fail (exit 1) when top-1 agreement is below this fraction (0-1).")
def validate_cmd(fp_model, q_model, data, preset, resize, crop, mean, std, channel_order, pixel_scale, class_list, provider, batch_size, report_path, max_drop, min_agreement):
    """Compare FP_MODEL and its quantized copy Q_MODEL in ONNX Runtime and gate on accuracy."""
    recipe_options = {"resize": resize, "crop": crop, "mean": mean, "std": std, "channel_order": channel_order, "pixel_scale": pixel_scale}
    given = [name for name, value in recipe_options.items() if value is not None] + (["preprocess"] if preset else [])
    if data and data.lower().endswith(".npz") and given:
        raise DataError(f"--{given[0].replace('_', '-')} does not apply to an .npz: its images are already preprocessed")
    config = ValidateConfig(
        data=data,
        preprocess=preprocess_from_preset(preset, **recipe_options),
        class_list=class_list,
        provider=provider.lower(),
        batch_size=batch_size,
        max_drop=max_drop,
        min_agreement=min_agreement,
        report_path=report_path,
    )
    report = validate(fp_model, q_model, config)
    click.echo(report.table())
    if report_path:
        click.echo(f"report written to {report_path}")
    check_gate(report, max_drop, min_agreement)
