"""``dsgonnx synthesize MODEL -o OUT.npz``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dsgonnx import DEFAULT_HOLDOUT, Alignment, SlackReading, SynthConfig, SynthMethod, SynthStart, is_writer
from dsgonnx_cli.options import (PREPROCESS_HELP, choice, device_option, input_shape_option, preprocess_options,
                                 quiet_option)

_EPILOG = """\b
Methods: auto (dsg where the model carries BatchNorm statistics, else
procedural), gaussian (N(0,1) noise), zeroq (BN statistics matching), dsg
(slack alignment + layerwise sample enhancement + sample correlation
inhibition), procedural (dead-leaves images; needs nothing from the model),
inversion (from procedural images: cross-entropy to random classes, each Conv
output held to the statistics of the start images, total variation, jitter
and SCI; needs no BN statistics).
Give the model's preprocessing so that images stay inside the range real
images have; without it only the input prior (mean 0, std 1) shapes them.
""" + PREPROCESS_HELP


@click.command("synthesize", epilog=_EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output .npz [default: <model stem>.<method>.npz].")
@click.option("--method", type=choice(SynthMethod), default=SynthMethod.AUTO.value, show_default=True)
@click.option("--num-samples", type=int, default=64, show_default=True)
@click.option("--holdout", type=click.IntRange(min=0), default=DEFAULT_HOLDOUT, show_default=True,
              help="Synthesize this many samples more, kept apart in the .npz: quantize --calib OUT.npz checks "
                   "the models it weighs, and validates without --val-data, on them.")
@click.option("--iters", type=int, help="Optimisation steps [default: 500 on CUDA (the papers'); on CPU 100, the first 75 at 128 px for inputs >= 160 px].")
@click.option("--lr", type=float, help="Adam learning rate [default: 0.1; 0.01 for inversion].")
@click.option("--batch-size", type=int, help="Samples optimised together [default: all, up to a memory cap].")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("Synthesis device.")
@click.option("--epsilon", type=float, default=SynthConfig.epsilon, show_default=True,
              help="Slack percentile ε (DSG's per-sample alignment).")
@click.option("--slack-reading", type=choice(SlackReading), default=SynthConfig.slack_reading.value, show_default=True,
              help="How margins are read from ε (see README).")
@click.option("--no-slack", is_flag=True, help="DSG without slack margins (ablation).")
@click.option("--no-lse", is_flag=True, help="DSG without layerwise sample enhancement (ablation).")
@click.option("--no-sci", is_flag=True, help="DSG without sample correlation inhibition (ablation).")
@click.option("--no-input-prior", is_flag=True, help="Drop the input mean-0/std-1 prior.")
@click.option("--ce-weight", type=float, help="Cross-entropy to random labels [default: 1 for inversion, else 0].")
@click.option("--tv-weight", type=float, help="Total-variation prior [default: 0.5 for inversion, else 0].")
@click.option("--l2-weight", type=float, help="Image L2 prior [default: 0].")
@click.option("--anchor-weight", type=float,
              help="Inversion: Conv outputs held to their procedural start's statistics [default: 10 for inversion].")
@click.option("--jitter/--no-jitter", default=None,
              help="Each step on a randomly shifted (up to 1/8 of the side, wrapped) and mirrored copy of the batch "
                   "(DeepInversion's jitter) [default: on for inversion, else off].")
@click.option("--alignment", type=choice(Alignment),
              help="zeroq/dsg: hold each sample's BN statistics to the running ones (sample: ZeroQ, DSG) or the "
                   "batch's pooled statistics (batch: DeepInversion, GDFQ; no slack margins or LSE) "
                   "[default: sample; quantize --refine or --qat synthesizes with batch].")
@click.option("--normalize-gaps/--absolute-gaps", default=None,
              help="zeroq/dsg: BN gaps in units of each channel's running std, every layer on one scale "
                   "[default: absolute, the papers'].")
@click.option("--start", type=choice(SynthStart), default=SynthStart.GAUSSIAN.value, show_default=True,
              help="zeroq/dsg: optimise from N(0,1) noise (the papers') or from dead-leaves images, each with its own "
                   "colours, contrast and scales (slack margins are read on noise either way).")
@click.option("--generator", is_flag=True,
              help="zeroq/dsg: each batch's images are a fresh generator's output G(z), the generator and one latent "
                   "per image learned by the method's losses (Genie's parameterisation) instead of the pixels.")
@click.option("--swing", is_flag=True,
              help="Each step, every strided convolution sees its input shifted by up to one pixel, reflected at the "
                   "border (Genie's swing convolution).")
@click.option("--mix-model", "mix_models", type=click.Path(dir_okay=False), multiple=True,
              help="zeroq/dsg: another model that takes the same images (same size and preprocessing); the images "
                   "match its BN statistics too, the loss averaged over the models (MixMix; repeatable).")
@click.option("--low-res", type=int, help="Resolution schedule: optimise at NxN pixels (below the input size) first, then at full size (0: off).")
@click.option("--low-res-share", type=float, default=0.75, show_default=True, help="Share of iterations at --low-res.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast on CUDA (statistics stay float32).")
@preprocess_options()
@input_shape_option
@click.option("--preview", type=click.Path(dir_okay=False), help="Also write a PNG grid of the images.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@quiet_option
def synthesize_cmd(model, output, preprocess, preprocess_given, input_shape, preview, force, no_slack, no_lse, no_sci,
                   no_input_prior, holdout, **settings):
    """Synthesize calibration images for MODEL (from its BatchNorm statistics where it has them)."""
    from dsgonnx import synthesize

    settings = {name: value for name, value in settings.items()
                if not (name in ("normalize_gaps", "jitter") and value is None)}
    config = SynthConfig(preprocess=preprocess, slack=not no_slack, lse=not no_lse, sci=not no_sci,
                         input_prior=not no_input_prior, **settings)
    out = output if output is not None else Path(model).with_name(f"{Path(model).stem}.{config.method}.npz")
    result = synthesize(model, config, holdout=holdout, input_shape=input_shape, output=out, preview=preview,
                        force=force)
    if not is_writer():  # under torchrun, rank 0 alone reports
        return
    click.echo(json.dumps({"output": str(out), "images": list(result.images.shape),
                           "holdout": 0 if result.holdout is None else len(result.holdout), "seconds": result.meta["seconds"],
                           "seconds_per_iter": result.meta["seconds_per_iter"], "device": result.meta["device"],
                           "diversity": result.meta["diversity"]}, indent=2))
