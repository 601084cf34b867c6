"""The model's image input: one description for every stage (numpy only).

The front end (:mod:`dsgonnx.graph.onnx_io`) builds it from the ONNX graph, validation
(:mod:`dsgonnx.validation.sessions`) from ONNX Runtime's view of both models; the layout
rule (which axis holds the channels) lives here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import InputSpecError

IMAGE_CHANNELS = (1, 3, 4)


def layout_of(shape) -> Optional[str]:
    """``"NCHW"``, ``"NHWC"`` (channels last, as in TensorFlow exports) or None (not an
    image). Sizes are ints when fixed and None when dynamic; dynamic channels count as NCHW,
    except N×?×?×C (dynamic height and width, channels last)."""
    if len(shape) != 4:
        return None
    if shape[1] in IMAGE_CHANNELS:
        return "NCHW"
    if shape[3] in IMAGE_CHANNELS and (shape[1] is not None or shape[2] is None):
        return "NHWC"
    return "NCHW" if shape[1] is None else None


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    """Parse ``1x3x224x224`` (also ``1,3,224,224``) into four positive ints."""
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise InputSpecError(f"`input_shape` must look like 1x3x224x224 (four positive sizes), got {text!r}")
    return dims  # type: ignore[return-value]


def format_dims(shape) -> str:
    """``(None, 3, 224, 224)`` -> ``"?×3×224×224"`` (dynamic sizes as ``?``)."""
    return "×".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in shape)


@dataclass(frozen=True)
class InputSpec:
    """An image input: name, shape (an int for each fixed size, None for dynamic ones) and
    element type. For a loaded model C, H and W are always resolved."""

    name: str
    shape: tuple
    dtype: np.dtype

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(d if isinstance(d, (int, np.integer)) and d > 0 else None
                                                for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def layout(self) -> Optional[str]:
        return layout_of(self.shape)

    @property
    def takes_pixels(self) -> bool:
        """Whether the input takes whole pixels (:func:`is_pixel_type`)."""
        return is_pixel_type(self.dtype)

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the model demands, None for any."""
        return self.shape[0] if self.shape else None

    @property
    def dynamic_batch(self) -> bool:
        return self.fixed_batch is None

    @property
    def chw(self) -> tuple:
        """(channels, height, width), whatever the layout."""
        if self.layout == "NHWC":
            return self.shape[3], self.shape[1], self.shape[2]
        return tuple(self.shape[1:4])

    @property
    def image_size(self) -> Optional[int]:
        """The square input size in pixels, None when dynamic; error for non-square inputs."""
        _, height, width = self.chw
        fixed = {dim for dim in (height, width) if dim is not None}
        if len(fixed) > 1:
            raise InputSpecError(
                f"input {self.name!r} is {height}×{width}: image folders need a square input; give an .npz instead"
            )
        return fixed.pop() if fixed else None

    def batch_shape(self, batch: int) -> tuple:
        """The concrete shape of a batch; a model with a fixed batch only takes that."""
        if self.fixed_batch is not None and self.fixed_batch != batch:
            raise InputSpecError(f"input '{self.name}' has a fixed batch of {self.fixed_batch}, not {batch}")
        return (batch, *self.shape[1:])

    def describe(self) -> str:
        return f"{self.name} {format_dims(self.shape)} {self.dtype.name}"


# image inputs dsgonnx takes besides floats: 8-bit pixels, the model converting them itself
# (a Cast to float first); worked on through a float32 twin (dsgonnx.graph.onnx_io)
INTEGER_INPUT_TYPES = (np.dtype(np.uint8),)


def is_pixel_type(dtype) -> bool:
    """Whether an image input of ``dtype`` takes whole pixels: an integer element type (uint8)."""
    return np.dtype(dtype).kind in "ui"


def as_input_type(images: np.ndarray, dtype) -> np.ndarray:
    """``images`` as an input of ``dtype`` takes them: for an integer type, rounded to the
    nearest whole value and clipped into its range (what the pixels of a photo are)."""
    dtype = np.dtype(dtype)
    if is_pixel_type(dtype):
        info = np.iinfo(dtype)
        return np.clip(np.rint(images), info.min, info.max).astype(dtype)
    return images.astype(dtype, copy=False)
