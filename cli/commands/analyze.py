"""``dsgonnx analyze MODEL``: per-tensor sensitivity of a quantization setting."""

from __future__ import annotations

import click

from dsgonnx_cli.commands.quantize import quant_config, quantize_cmd
from dsgonnx_cli.options import RECIPE_PARAMS, preprocess_options

# quantize's options, less those about writing and validating the model (the preprocessing
# options come from their own decorator, which turns them into one recipe)
_SKIP = {"output", "val_data", "max_drop", "min_agreement", "report", "provider", "no_validate", "force",
         *RECIPE_PARAMS}

_EPILOG = """\b
Quantizes MODEL exactly as `dsgonnx quantize` would with the same options,
then measures every quantized tensor (model input, activations, weights)
against the float model twice: quantized alone (everything else float), and
kept float (everything else quantized). Output SQNR (dB) and top-1
agreement; top-1 too with --data. Without --data it measures on held-out
synthetic samples (data-free). A sorted table goes to stderr.

With --quantized Q_MODEL it analyzes that model instead (one dsgonnx
quantize wrote from MODEL, e.g. on another machine; needs --data; quantize's
options do not apply). --exact runs the probes as written, without ONNX
Runtime's fused integer kernels (see dsgonnx validate --exact).
"""


@click.command("analyze", epilog=_EPILOG)
@preprocess_options()
@click.option("--data", type=click.Path(), help="Labelled images (folder or .npz) to measure on; calibration files are left out.")
@click.option("--eval-samples", type=int, default=256, show_default=True, help="Samples to measure on (spread over --data).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@click.option("--chart", type=click.Path(dir_okay=False), help="Write a PNG bar chart of the most damaging tensors.")
@click.option("--quantized", type=click.Path(dir_okay=False),
              help="Analyze this QDQ model of MODEL (written by dsgonnx quantize) instead of quantizing; needs --data.")
@click.option("--exact", is_flag=True, help="Run the probes as written, without ORT's fused integer kernels.")
def analyze_cmd(model, data, eval_samples, report, chart, quantized, exact, **flags):
    """Which quantized tensors of MODEL cost the accuracy, one at a time."""
    from click.core import ParameterSource

    from dsgonnx import DataError, analyze

    context = click.get_current_context()
    if quantized is not None:
        given = [name for name in flags if context.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given:
            raise DataError(f"--{given[0].replace('_', '-')} is a quantize option; it does not apply with --quantized")
    result = analyze(model, quant_config(**flags), data=data, eval_samples=eval_samples, report=report,
                     chart=chart, quantized=quantized, exact=exact)
    worst = result.ranked()[0]
    click.echo(f"most damaging: {worst.kind} {worst.tensor} (alone: SQNR {worst.alone['sqnr_db']} dB); "
               f"all quantized: SQNR {result.full['sqnr_db']} dB, agreement {result.full['agreement']}")


analyze_cmd.params = [p for p in quantize_cmd.params if p.name not in _SKIP] + analyze_cmd.params
