"""``dsgonnx synthesize MODEL -o OUT.npz``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsgonnx.errors import DataError
from dsgonnx.graph.onnx_io import parse_input_shape
from dsgonnx.preprocess import preprocess_from_preset
from dsgonnx_cli.options import PREPROCESS_HELP, input_shape_option, preprocess_options, recipe_given

_EPILOG = """\b
Methods: gaussian (N(0,1) noise), zeroq (BN statistics matching), dsg (slack
alignment + layerwise sample enhancement + sample correlation inhibition).
Give the model's preprocessing so that images stay inside the range real
images have; without it only the input prior (mean 0, std 1) shapes them.
""" + PREPROCESS_HELP


@click.command("synthesize", epilog=_EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .npz [default: <model stem>.<method>.npz].")
@click.option("--method", type=click.Choice(["dsg", "zeroq", "gaussian"]), default="dsg", show_default=True)
@click.option("--num-samples", type=int, default=64, show_default=True)
@click.option("--iters", type=int, default=500, show_default=True, help="Optimisation steps (papers: 500).")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=int, help="Samples optimised together [default: all, up to a memory cap].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--epsilon", type=float, default=0.9, show_default=True, help="Slack percentile ε.")
@click.option("--slack-reading", type=click.Choice(["layer-upper", "layer-lower", "sample-upper", "sample-lower",
                                                    "channel-upper", "channel-lower"]),
              default="layer-lower", show_default=True, help="How margins are read from ε (see README).")
@click.option("--no-slack", is_flag=True, help="DSG without slack margins (ablation).")
@click.option("--no-lse", is_flag=True, help="DSG without layerwise sample enhancement (ablation).")
@click.option("--no-sci", is_flag=True, help="DSG without sample correlation inhibition (ablation).")
@click.option("--no-input-prior", is_flag=True, help="Drop the input mean-0/std-1 prior.")
@click.option("--ce-weight", type=float, default=0.0, show_default=True, help="Cross-entropy to random labels.")
@click.option("--tv-weight", type=float, default=0.0, show_default=True, help="Total-variation prior.")
@click.option("--l2-weight", type=float, default=0.0, show_default=True, help="Image L2 prior.")
@click.option("--low-res", type=int, help="Resolution schedule: optimise at NxN pixels first, then at full size.")
@click.option("--low-res-share", type=float, default=0.75, show_default=True, help="Share of iterations at --low-res.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast on CUDA (statistics stay float32).")
@preprocess_options
@input_shape_option
@click.option("--preview", type=click.Path(dir_okay=False), help="Also write a PNG grid of the images.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def synthesize_cmd(model, output, method, num_samples, iters, lr, batch_size, seed, device, epsilon, slack_reading,
                   no_slack, no_lse, no_sci, no_input_prior, ce_weight, tv_weight, l2_weight, low_res, low_res_share, amp, recipe,
                   input_shape,
                   preview, force, quiet):
    """Synthesize calibration images for MODEL from its BatchNorm statistics."""
    from dsgonnx.graph.onnx_io import load_model
    from dsgonnx.synth import SynthConfig, synthesize
    from dsgonnx.synth.preview import save_grid

    out = Path(output) if output else Path(model).with_name(f"{Path(model).stem}.{method}.npz")
    if out.suffix != ".npz":
        raise DataError(f"output must be an .npz file, got {out.name!r}")
    if out.exists() and not force:
        raise DataError(f"{out} exists; pass --force to overwrite it")
    if preview and Path(preview).exists() and not force:
        raise DataError(f"{preview} exists; pass --force to overwrite it")
    preprocess = preprocess_from_preset(recipe[0], **recipe[1]) if recipe_given(recipe) else None
    config = SynthConfig(
        method=method, num_samples=num_samples, iters=iters, lr=lr, batch_size=batch_size, seed=seed,
        device=device, epsilon=epsilon, slack_reading=slack_reading, slack=not no_slack, lse=not no_lse,
        sci=not no_sci, input_prior=not no_input_prior, ce_weight=ce_weight, tv_weight=tv_weight,
        l2_weight=l2_weight, low_res=low_res, low_res_share=low_res_share, amp=amp, preprocess=preprocess,
        quiet=quiet,
    )
    loaded = load_model(model, parse_input_shape(input_shape) if input_shape else None)
    result = synthesize(loaded, config)
    result.save(out)
    if preview:
        save_grid(result.images, preview, preprocess)
    diversity = result.meta["diversity"]
    click.echo(json.dumps({"output": str(out), "images": list(result.images.shape), "seconds": result.meta["seconds"],
                           "seconds_per_iter": result.meta["seconds_per_iter"], "device": result.meta["device"],
                           "diversity": diversity}, indent=2))
