"""``dsgonnx validate``: compare an FP and a quantized model; exit 1 when the gate fails."""

from __future__ import annotations

import click

from dsgonnx import DEFAULT_BATCH_SIZE, DataError, ValidateConfig
from dsgonnx_cli.options import PREPROCESS_HELP, preprocess_options, provider_option

_EPILOG = """\b
Exit status: 0 validated (gate held), 1 gate failed, 2 bad input.
\b
Data: a folder of class sub-folders (label = position of the folder name in the
sorted list; the number of folders must equal the model's classes unless
--classes is given), a flat folder of images (unlabelled), or an .npz with
'images' (preprocessed, model layout) and optional 'labels'.
\b
Without --preprocess the imagenet preset is used; a model that takes uint8
pixels gets them 0-255 as they are (it normalises them itself).
""" + PREPROCESS_HELP


@click.command("validate", epilog=_EPILOG)
@click.argument("fp_model", type=click.Path(dir_okay=False))
@click.argument("q_model", type=click.Path(dir_okay=False))
@click.option("--data", "data", type=click.Path(), help="Image folder (class sub-folders or flat) or .npz file.")
@preprocess_options()
@click.option("--classes", "class_list", type=click.Path(), help="Text file: the model's class names in output order, one per line.")
@provider_option
@click.option("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, show_default=True, help="Samples per inference call.")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here (atomically).")
@click.option("--max-drop", type=float, help="Fail (exit 1) when top-1 drops by more than this many points.")
@click.option("--min-agreement", type=float, help="Fail (exit 1) when top-1 agreement is below this fraction (0-1).")
@click.option("--exact", is_flag=True,
              help="Run Q_MODEL's QDQ graph as written (no fused integer kernels): what a CPU whose int8 kernels "
                   "cannot saturate (VNNI, ARM) computes, here. For a model quantized without reduce_range, "
                   "scored on x86 without VNNI; slower.")
@click.option("--per-tensor", is_flag=True,
              help="Also compare every activation Q_MODEL (QDQ) quantizes with FP_MODEL's tensor of the same name: "
                   "SQNR of the quantized model there, of the FP tensor on that grid alone, and the share it clips "
                   "(the QDQ graph as written, on the CPU).")
def validate_cmd(fp_model, q_model, data, preprocess, preprocess_given, class_list, provider, batch_size, report_path,
                 max_drop, min_agreement, exact, per_tensor):
    """Compare FP_MODEL and its quantized copy Q_MODEL in ONNX Runtime and gate on accuracy."""
    from dsgonnx import check_gate, validate
    from dsgonnx_cli.main import spell

    if data and data.lower().endswith(".npz") and preprocess_given:
        raise DataError(f"{preprocess_given[0]} does not apply to an .npz: its images are already preprocessed")
    config = ValidateConfig(data=data, preprocess=preprocess, class_list=class_list, provider=provider,
                            batch_size=batch_size, max_drop=max_drop, min_agreement=min_agreement,
                            report_path=report_path, exact=exact, per_tensor=per_tensor)
    report = validate(fp_model, q_model, config)
    click.echo(spell(report.table(), click.get_current_context().command))
    if report_path:
        click.echo(f"report written to {report_path}")
    check_gate(report, max_drop, min_agreement)
