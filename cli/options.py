"""Option groups shared by several commands (one definition, one meaning)."""

from __future__ import annotations

import functools
import logging

import click

from dsgonnx import PRESETS, Device, Provider, preprocess_from_preset

PREPROCESS_HELP = """\b
Preprocessing: a preset, and explicit values that override it.
mean/std are in the units of the pixel scale (1: pixels 0-1, 255: 0-255),
listed in the model's channel order. The crop follows the model's input size.
  imagenet   RGB 0-1, mean 0.485,0.456,0.406 std 0.229,0.224,0.225, resize 256/crop 224
  inception  RGB 0-1, mean 0.5 std 0.5
  tf-lite    RGB 0-255, mean 127 std 128
  none       RGB 0-255, no normalisation, resize = crop
CIFAR-size models take their 32x32 images as they are: --resize 32 --crop 32.
"""

_RECIPE_KEYS = ("resize", "crop", "mean", "std", "channel_order", "pixel_scale")
RECIPE_PARAMS = ("preset", *_RECIPE_KEYS)  # the click parameters preprocess_options adds


def choice(enum) -> click.Choice:
    """A click choice of a dsgonnx.config enum's values."""
    return click.Choice(enum.values(), case_sensitive=False)


def preprocess_options():
    """--preprocess PRESET, --resize, --crop, --mean, --std, --channel-order, --pixel-scale.

    The command receives ``preprocess``: the recipe, or None when no flag was given (the
    library's default then); and ``preprocess_given``: the flags given.
    """

    def decorate(func):
        @click.option("--preprocess", "preset", type=click.Choice(sorted(PRESETS), case_sensitive=False),
                      help="Preprocessing preset of the model.")
        @click.option("--resize", type=int, help="Resize the shorter side to N pixels (overrides the preset).")
        @click.option("--crop", type=int, help="Centre crop N x N (default: the model's input size).")
        @click.option("--mean", help="Per-channel mean, 'a,b,c' or one value.")
        @click.option("--std", help="Per-channel std, 'a,b,c' or one value.")
        @click.option("--channel-order", type=click.Choice(["rgb", "bgr"], case_sensitive=False),
                      help="Channel order the model expects.")
        @click.option("--pixel-scale", type=float, help="Pixel value of white before mean/std: 1 or 255.")
        @functools.wraps(func)
        def wrapper(*args, preset, **kwargs):
            overrides = {key: kwargs.pop(key) for key in _RECIPE_KEYS}
            overrides = {key: value for key, value in overrides.items() if value is not None}
            given = (["--preprocess"] if preset else []) + [f"--{key.replace('_', '-')}" for key in overrides]
            recipe = preprocess_from_preset(preset, **overrides) if given else None
            return func(*args, preprocess=recipe, preprocess_given=given, **kwargs)

        return wrapper

    return decorate


def input_shape_option(func):
    return click.option("--input-shape", metavar="NxCxHxW", default=None,
                        help="Fix dynamic input dimensions, e.g. 1x3x224x224.")(func)


def device_option(help_text: str):
    return click.option("--device", type=choice(Device), default=Device.AUTO.value, show_default=True, help=help_text)


def provider_option(func):
    return click.option("--provider", type=choice(Provider), default=Provider.AUTO.value, show_default=True,
                        help="auto = CUDA when it really works, else CPU.")(func)


def _quiet(ctx, param, value):
    if value:
        logging.getLogger("dsgonnx").setLevel(logging.WARNING)


def quiet_option(func):
    return click.option("--quiet", is_flag=True, expose_value=False, callback=_quiet,
                        help="No progress on stderr (errors still go there).")(func)
