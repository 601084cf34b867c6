"""``dsgonnx quantize MODEL``: QDQ model calibrated on synthetic (or real) data."""

from __future__ import annotations

import json

import click

from dsgonnx import (DEFAULT_HOLDOUT, Alignment, BiasCorrection, Calibrator, DataError, LogitsPolicy, PoolRange, QatConfig, QuantConfig, RefineConfig, RefineMethod, Rounding, SlackReading,
                     SynthOptions, SynthStart, Target)
from dsgonnx_cli.options import (PREPROCESS_HELP, choice, device_option, input_shape_option, preprocess_options,
                                 provider_option, quiet_option)

_EPILOG = """\b
Bits: 8 -> int8/uint8, 4 -> INT4/UINT4 (opset 21), 16 -> int16/uint16,
2/3/5/6/7 -> simulated exactly in 8-bit containers (reported as simulated).
Targets: cpu = uint8 activations + int8 per-channel weights (reduce_range on
CPUs without VNNI); gpu/trt = symmetric int8 (trt: 8 bits only).
Calibration: auto (default: dsg where the model carries BatchNorm statistics,
else procedural), dsg, zeroq, procedural (dead-leaves images), inversion,
gaussian, or real data: an image folder or an .npz with 'images' (also a set
written by dsgonnx synthesize). A BN-folded model gets procedural images.
Logits: by default the classifier's output stays float (a range learned on
synthetic data clips real logits into ties); --logits exclude keeps the
whole last layer float, --logits quantize quantizes it too.
Refine: --refine brecq (blocks between residual joins, with QDrop) or
adaround (layer by layer) learns the weight rounding on the calibration
data; the QDQ model holds exactly the learned integers. W4A4 needs it.
QAT: --qat trains the quantized model end to end (weights, biases, weight
and activation steps) by distillation from the float model on the
calibration data or, with --calib dsg/zeroq on a model with BN statistics,
on a generator's fresh images; --qat-checkpoint/--qat-resume continue a long run,
--qat-time-budget stops it in time and exports what it learned.
\b
Exit status: 0 written (and gate held), 1 gate failed (model and report are
written), 2 bad input (nothing written).
\b
""" + PREPROCESS_HELP

# flag -> SynthOptions / RefineConfig field, for the flags that tune a nested setting
_SYNTH_FLAGS = {"lr": "lr", "slack_reading": "slack_reading", "low_res": "low_res", "normalize_gaps": "normalize_gaps",
                "alignment": "alignment", "ce_weight": "ce_weight", "synth_start": "start",
                "synth_generator": "generator", "synth_swing": "swing", "synth_mix_models": "mix_models"}
_REFINE_FLAGS = {"refine_iters": "iters", "refine_lr": "lr", "refine_reg": "reg_weight", "refine_drop": "drop_prob",
                 "refine_batch_size": "batch_size", "refine_act_lr": "act_lr",
                 "refine_weight_step_lr": "weight_step_lr", "refine_start": "start",
                 "refine_views": "views", "refine_input_drop": "input_drop",
                 "refine_correct_inside": "correct_inside", "refine_inside_means": "inside_means",
                 "refine_prediction_weight": "prediction_weight",
                 "refine_prediction_temperature": "prediction_temperature"}
_QAT_FLAGS = {"qat_iters": "iters", "qat_lr": "lr", "qat_batch_size": "batch_size", "qat_act_lr": "act_lr",
              "qat_weight_step_lr": "weight_step_lr", "qat_time_budget": "time_budget", "qat_checkpoint": "checkpoint",
              "qat_augment": "augment", "qat_data": "data", "qat_generator_loss": "generator_loss",
              "qat_generator_lr": "generator_lr", "qat_generator_warmup": "generator_warmup",
              "qat_optimizer": "optimizer", "qat_loss": "loss", "qat_start": "start",
              "qat_mix": "mix", "qat_feature_weight": "feature_weight"}


def _bits(w8a8, w6a6, w4a4, wbits, abits):
    presets = [b for b, flag in ((8, w8a8), (6, w6a6), (4, w4a4)) if flag]
    if len(presets) > 1 or (presets and (wbits is not None or abits is not None)):
        raise DataError("give one of --w8a8, --w6a6, --w4a4, or --wbits/--abits")
    if presets:
        return presets[0], presets[0]
    return 8 if wbits is None else wbits, 8 if abits is None else abits


def _given(values: dict, fields: dict) -> dict:
    return {field: values[flag] for flag, field in fields.items() if values[flag] not in (None, ())}


@click.command("quantize", epilog=_EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output model [default: <stem>.w8a8.onnx beside MODEL].")
@click.option("--w8a8", is_flag=True, help="8-bit weights and activations (default).")
@click.option("--w6a6", is_flag=True, help="6-bit weights and activations (simulated).")
@click.option("--w4a4", is_flag=True, help="4-bit weights and activations (INT4/UINT4).")
@click.option("--wbits", type=int, help="Weight bits (2-8 or 16).")
@click.option("--abits", type=int, help="Activation bits (2-8 or 16).")
@click.option("--calib", default="auto", show_default=True,
              help="auto | dsg | zeroq | procedural | inversion | gaussian | image folder | .npz")
@click.option("--num-samples", type=int, default=64, show_default=True, help="Calibration samples.")
@click.option("--iters", type=int, help="Synthesis iterations [default: 500 on CUDA; on CPU 100, the first 75 at 128 px for inputs >= 160 px].")
@click.option("--lr", type=float, help="Synthesis learning rate.")
@click.option("--slack-reading", type=choice(SlackReading), help="DSG margin reading (see dsgonnx synthesize --help).")
@click.option("--low-res", type=int, help="Synthesis resolution schedule: start at NxN pixels (0: off).")
@click.option("--alignment", type=choice(Alignment), help="Synthesis: per-sample or batch BN alignment (see dsgonnx synthesize --help) "
                   "[default: batch with --refine or --qat (they train on the images), else sample].")
@click.option("--ce-weight", type=float, help="Synthesis: cross-entropy to a random class per image (see dsgonnx synthesize --help).")
@click.option("--synth-start", type=choice(SynthStart),
              help="Synthesis: optimise from noise or dead-leaves images (see dsgonnx synthesize --start) [default: procedural with --refine on a model with depthwise "
                   "convolutions, else gaussian].")
@click.option("--synth-generator", is_flag=True, default=None,
              help="Synthesis: images as a generator's output, generator and latents learned (see dsgonnx synthesize "
                   "--generator).")
@click.option("--synth-swing", is_flag=True, default=None,
              help="Synthesis: strided convolutions see shifted inputs (see dsgonnx synthesize --swing).")
@click.option("--synth-mix-model", "synth_mix_models", type=click.Path(dir_okay=False), multiple=True,
              help="Synthesis: images also made to match this model's BN statistics (repeatable; see dsgonnx "
                   "synthesize --mix-model).")
@click.option("--normalize-gaps/--absolute-gaps", default=None,
              help="Synthesis: BN gaps in units of each channel's running std (see dsgonnx synthesize --help).")
@click.option("--refine", type=choice(RefineMethod),
              help="Learn the weight rounding on the calibration data: adaround (layer by layer) or brecq "
                   "(blocks between residual joins, with QDrop).")
@click.option("--refine-iters", type=int, help="Refinement iterations per layer/block [default: 2000 on CUDA, 500 on CPU].")
@click.option("--refine-lr", type=float, help="Refinement learning rate (Adam on the rounding variables).")
@click.option("--refine-reg", type=float, help="Weight of AdaRound's rounding regulariser.")
@click.option("--refine-drop", type=float,
              help="QDrop probability of keeping an activation float while refining (to the nearest 1/256).")
@click.option("--refine-input-drop", type=float,
              help="QDrop's input mixing: the probability of each element of a block's input being the float "
                   "model's, else the quantized blocks' before it [default: --refine-drop's: 0.5 for brecq, 0 for "
                   "adaround; EfficientNet-Lite0 W4A4 DSG +7.56, see README].")
@click.option("--refine-batch-size", type=int, help="Refinement batch size.")
@click.option("--refine-act-lr", type=float,
              help="Learn the activation step sizes with the rounding at this rate (LSQ; relative steps) [default: 0, "
                   "the calibrated steps].")
@click.option("--refine-weight-step-lr", type=float,
              help="Learn each layer's weight steps with its rounding at this rate (Genie-M; relative steps), "
                   "exported as the weight scales; 0 keeps the clipping-searched steps [default: 1e-3 with real "
                   "calibration images, 0 with synthetic ones; see README, 'Learned weight steps'].")
@click.option("--refine-views", type=int,
              help="Reconstruct on each calibration image and N-1 flipped and shifted views of it [default: 1, "
                   "the images alone].")
@click.option("--refine-correct-inside/--refine-correct-after", default=None,
              help="Simulate the bias correction quantize writes (b - dW.E[x]) while reconstructing, so the "
                   "rounding is learned for the corrected model, or apply it to the written model only "
                   "[default: inside wherever biases are corrected; see README, 'Bias correction inside the "
                   "reconstruction'].")
@click.option("--refine-inside-means", type=click.Choice(RefineConfig.INSIDE_MEANS),
              help="E[x] of the correction simulated while reconstructing: the written correction's, or every "
                   "layer's input mean over the calibration images (the file is corrected with the written ones); "
                   "auto: calibration with synthetic images on a network with depthwise convolutions, else written "
                   "[default: auto; see README].")
@click.option("--refine-prediction-weight", type=float, metavar="W",
              help="Add PD-Quant's prediction difference to each block's loss: W times the KL of the softened "
                   "predictions, the block's quantized output run through the rest of the network in float "
                   "(PD-Quant's code: 10) [default: 0, the block's squared error alone].")
@click.option("--refine-prediction-temperature", type=float, metavar="T",
              help="Temperature of the prediction difference's softmax [default: 4].")
@click.option("--refine-start", type=click.Choice(RefineConfig.STARTS),
              help="The rounding each layer/block's learning starts from: nearest (AdaRound's), SQuant's data-free "
                   "flips of it on the layer's own grid, or auto: what quantize writes without --refine (SQuant's at "
                   "4 bits or fewer, else nearest; W4A4 EfficientNet-Lite0 +6.55 with real images, ResNet-20 DSG "
                   "-1.41, other ResNets within 0.34; see README) [default: auto].")
@click.option("--qat", is_flag=True,
              help="Quantization-aware training (W4A4 on the 100 batch-aligned DSG images it makes, CPU budgets: "
                   "ResNet-20/56 78.87/80.93 vs plain PTQ 76.92/71.41, MobileNet v1 0.75 50.56 vs 38.22; see README): "
                   "distil the float model into the quantized one on a generator's fresh images or the calibration data.")
@click.option("--qat-iters", type=int, help="QAT steps [default: 10000 on CUDA, 2000 on CPU].")
@click.option("--qat-lr", type=float, help="QAT learning rate of the weights and biases (Adam, cosine) [default: 1e-4].")
@click.option("--qat-batch-size", type=int, help="QAT batch size [default: 64].")
@click.option("--qat-act-lr", type=float, help="QAT rate of the activation steps (LSQ; 0 keeps the calibrated ones) [default: 1e-4].")
@click.option("--qat-weight-step-lr", type=float, help="QAT rate of the weight steps (0 keeps them) [default: 1e-3].")
@click.option("--qat-augment/--qat-no-augment", default=None, help="New views (flips, shifts) of the calibration images each step [default: on].")
@click.option("--qat-data", type=click.Choice(QatConfig.DATA),
              help="What QAT trains on: a generator's fresh images, trained alongside against the model's BN "
                   "statistics (GDFQ-style), the calibration images, or half of each; auto: the calibration images "
                   "(measured: they beat the generator on ResNet-20/56 W4A4) [default: auto].")
@click.option("--qat-generator-loss", type=click.Choice(QatConfig.GENERATOR_LOSSES),
              help="The generator's loss: DSG's (slack alignment, layerwise enhancement, correlation inhibition) or "
                   "GDFQ's batch statistics [default: bns for --calib zeroq, else dsg].")
@click.option("--qat-generator-lr", type=float, help="The generator's learning rate (Adam) [default: 1e-3].")
@click.option("--qat-generator-warmup", type=int, help="Generator steps before the model trains [default: 200].")
@click.option("--qat-optimizer", type=click.Choice(QatConfig.OPTIMIZERS),
              help="QAT's optimiser of the weights and biases (sgd: Nesterov momentum 0.9; the steps stay on Adam) "
                   "[default: adam].")
@click.option("--qat-loss", type=click.Choice(QatConfig.LOSSES),
              help="QAT's distillation loss on the float model's logits: their mean squared difference, or KL of the "
                   "softmax (the papers'; a 4-bit student lowers it by flattening its logits) [default: mse].")
@click.option("--qat-start", type=click.Choice(QatConfig.STARTS),
              help="The weight integers QAT starts from, on its own grid: nearest rounding, SQuant's data-free "
                   "flips of it, or reconstruction's learned rounding (run first, with --refine's method and "
                   "--refine-* settings, else brecq's defaults), bias-corrected each way; auto: the rounding "
                   "quantize writes without --qat (SQuant's at 4 bits or fewer, else nearest) [default: auto].")
@click.option("--qat-mix", type=click.Choice(QatConfig.MIXES),
              help="Blend half of each batch's calibration images pairwise: mixup (a weighted sum) or cutmix (a box "
                   "of another image), the teacher labelling each blend [default: none].")
@click.option("--qat-feature-weight", type=float, metavar="W",
              help="Also distil every trained layer's output: W times the mean over those layers of its squared "
                   "difference from the float model's, relative to the float output's square; 0: the logits alone "
                   "[default: 100 on networks without depthwise convolutions (W4A4 ResNet-56 80.93 vs 79.67), 0 "
                   "with them (MobileNet v1 0.75: 50.33 vs 50.56, no gain measured); see README].")
@click.option("--qat-time-budget", type=float, metavar="SECONDS", help="Stop QAT after this long and export what it learned.")
@click.option("--qat-checkpoint", type=click.Path(dir_okay=False), help="Save the QAT state to this file as it trains.")
@click.option("--qat-resume", is_flag=True, help="Continue QAT from --qat-checkpoint.")
@click.option("--fallback/--no-fallback", default=True, show_default=True,
              help="After --refine, --qat or --rounding squant, keep plain rounding (at 4 bits or fewer under --rounding auto, "
                   "also SQuant's) unless the learned model follows the float model at least as closely on one probe and "
                   "not measurably less closely on any (logit SQNR, paired bootstrap over the samples; probes: the held-out "
                   "synthetic samples, else the calibration images; procedural images, unless held-out DSG/ZeroQ samples "
                   "decide alone; and, where the calibration images are procedural and --refine/--qat learn from them, "
                   "32 inversion images).")
@click.option("--fallback-probes", metavar="LIST",
              help="The independent images --fallback checks on besides the held-out samples, instead of the rule "
                   "above: procedural, inversion (32 images synthesised with the run's --iters and synthesis options), "
                   "procedural,inversion, or none (the held-out samples, else the calibration images, alone).")
@click.option("--keep-candidates", type=click.Path(file_okay=False), metavar="DIR",
              help="Also write every model --fallback weighed into DIR (plain.onnx, squant.onnx, refined.onnx or "
                   "trained.onnx, refined-uncorrected.onnx), to score them on data you hold: its probes are synthetic.")
@click.option("--calibrator", type=choice(Calibrator), default=Calibrator.AUTO.value, show_default=True,
              help="Activation ranges; auto: mse for activations of 4 bits or fewer, else minmax.")
@click.option("--target", type=choice(Target), default=Target.CPU.value, show_default=True)
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--exclude", multiple=True, metavar="NODE", help="Keep this node in float (repeatable).")
@click.option("--logits", type=choice(LogitsPolicy), default=LogitsPolicy.EXCLUDE.value, show_default=True)
@click.option("--bias-correction", type=choice(BiasCorrection), default=BiasCorrection.AUTO.value, show_default=True,
              help="Remove the expected output shift of quantized weights: E[x] from BN statistics (analytic), "
                   "from the calibration images (empirical), auto = analytic where BN reaches, else empirical.")
@click.option("--rounding", type=choice(Rounding), default=Rounding.AUTO.value, show_default=True,
              help="Weight rounding without data: each weight to its nearest integer, or SQuant's flips that keep each "
                   "kernel's and output channel's summed rounding error within half a step; auto: squant for weights "
                   "of 4 bits or fewer (--refine/--qat learn the rounding instead).")
@click.option("--mixed", type=click.Choice(["auto", "off"]), default="off", show_default=True,
              help="auto: keep the tensors whose quantization costs the most at 8 bits (simulated widths).")
@click.option("--mixed-budget", type=float, default=0.05, show_default=True,
              help="Share of the weight values (and of the activation tensors) --mixed auto may keep at 8 bits.")
@click.option("--cle/--no-cle", default=False, show_default=True,
              help="Cross-layer equalization before calibration (measured to hurt with per-channel weights).")
@click.option("--pool-range", type=choice(PoolRange), default=PoolRange.INPUT.value, show_default=True,
              help="Range of an averaging pool's output: its input's (never clips; synthetic data under-ranges "
                   "pooled features) or its own calibrated one.")
@click.option("--first-layer-8bit/--no-first-layer-8bit", default=True, show_default=True,
              help="Below 8 bits, keep the model input and the first layer's weights at 8 bits (in 8-bit types "
                   "at 4 bits).")
@input_shape_option
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("Synthesis and refinement device.")
@preprocess_options()
@click.option("--val-data", type=click.Path(), help="Labelled images to validate on (calibration files are left out).")
@click.option("--classes", "class_list", type=click.Path(),
              help="Text file: the model's class names in output order, one per line (a --val-data folder with "
                   "a subset of the classes).")
@click.option("--holdout", type=click.IntRange(min=0), default=DEFAULT_HOLDOUT, show_default=True,
              help="Samples kept out of calibration, to check learned models (and validate without "
                   "--val-data) on: synthesized beside the calibration images, at most this many of an .npz "
                   "set's (dsgonnx synthesize --holdout), else this many images of --calib not calibrated on "
                   "(left out of --val-data too).")
@click.option("--max-drop", type=float, help="Exit 1 when top-1 drops by more than this many points.")
@click.option("--min-agreement", type=float, help="Exit 1 when top-1 agreement falls below this fraction.")
@click.option("--report", type=click.Path(dir_okay=False), help="Write the JSON report here.")
@provider_option
@click.option("--no-validate", is_flag=True, help="Skip the validation step.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@quiet_option
def quantize_cmd(model, **flags):
    """Quantize MODEL to a QuantizeLinear/DequantizeLinear ONNX model."""
    from dsgonnx import quantize

    result = quantize(model, quant_config(**flags))
    if result.output is not None:  # under torchrun, rank 0 alone quantizes and reports
        click.echo(json.dumps(result.summary(), indent=2, default=str))


def quant_config(w8a8, w6a6, w4a4, wbits, abits, refine, preprocess, preprocess_given, no_validate=False,
                 qat=False, qat_resume=False, **flags) -> QuantConfig:
    """The QuantConfig that quantize's flags describe (also used by ``dsgonnx analyze``)."""
    w, a = _bits(w8a8, w6a6, w4a4, wbits, abits)
    synth, refine_options = _given(flags, _SYNTH_FLAGS), _given(flags, _REFINE_FLAGS)
    qat_options = _given(flags, _QAT_FLAGS) | ({"resume": True} if qat_resume else {})
    from_refine = qat and qat_options.get("start") == "refine"  # --refine/--refine-* set the reconstruction
    if refine_options and not (refine or from_refine):
        raise DataError("--refine-* options need --refine adaround|brecq (or --qat --qat-start refine)")
    if qat_options and not qat:
        raise DataError("--qat-* options need --qat")
    if qat and refine and not from_refine:
        raise DataError("--qat and --refine are two ways to learn the quantized model; give one "
                        "(or --qat-start refine to train from --refine's result)")
    rest = {key: value for key, value in flags.items()
            if key not in _SYNTH_FLAGS and key not in _REFINE_FLAGS and key not in _QAT_FLAGS}
    rest["mixed"] = rest.get("mixed", "off") == "auto"
    return QuantConfig(wbits=w, abits=a, preprocess=preprocess, validate=not no_validate,
                       synth=SynthOptions(**synth),
                       refine=(RefineConfig(**({"method": refine} if refine else {}), **refine_options)
                               if refine or refine_options else None),
                       qat=QatConfig(**qat_options) if qat else None, **rest)
