"""Calibration images that are not synthesized here: an image folder, an ``.npz``, an array
or a :class:`~dsgonnx.SyntheticSet` in memory; a deterministic spread subset of them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import SyntheticSet
from .config import SynthMethod
from .errors import DataError
from .inputs import InputSpec
from .preprocess import (IMAGE_FILE_CHANNELS, Preprocess, as_floats, check_images, load_image, preprocess_from_preset,
                         read_npz, scan_image_folder)


@dataclass
class RealImages:
    images: np.ndarray  # float32 NCHW, model input space
    files: tuple[str, ...]  # the image files used (empty for arrays and .npz files)
    source: str
    method: str = "real"  # a synthetic set (dsgonnx synthesize) keeps its method
    # kept out of calibration (float32 NCHW): a synthetic set's own held-out samples, else unused ones of the source
    holdout: Optional[np.ndarray] = None
    holdout_files: tuple[str, ...] = ()  # the image files held out (a folder)


def spread_indices(total: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(total)``: every k-th item from 0, so a
    class-sorted folder gives every class its share (1000 files, 100 wanted: 0, 10, 20...)."""
    if count >= total:
        return np.arange(total)
    stride = total // count
    return np.arange(count) * stride


def unused_indices(total: int, chosen: np.ndarray, count: int) -> np.ndarray:
    """``count`` indices of ``range(total)`` outside ``chosen``, spread evenly over the unused
    ones as :func:`spread_indices` spreads; none when fewer than ``count`` are unused."""
    unused = np.setdiff1d(np.arange(total), chosen)
    if count < 1 or len(unused) < count:
        return np.arange(0)
    return unused[spread_indices(len(unused), count)]


def load_real_images(source, spec: InputSpec, count: int, preprocess: Preprocess | None,
                     holdout: int = 0, pixels: bool = False) -> RealImages:
    """Up to ``count`` calibration images from ``source``: a path (image folder or .npz), a
    float NCHW array in the model's input space, or a SyntheticSet. Held out beside them: the
    samples of a set that has some (``dsgonnx synthesize --holdout``), else ``holdout`` more of
    the source's images, spread evenly over those not calibrated on, when it has that many
    (:func:`unused_indices`; never calibrated on, so the fallback and validation can check on them).
    ``pixels`` (a model that takes uint8 pixels): uint8 arrays are taken too, as float32."""
    if isinstance(source, SyntheticSet):
        return _from_array(source.images, spec, count, "SyntheticSet in memory", source.meta.get("method", "real"),
                           source.holdout, holdout, pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, spec, count, "array in memory", spare=holdout, pixels=pixels)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise DataError(f"calibration data not found: {path}")
    if os.path.isdir(path):
        channels = spec.chw[0]
        if channels not in IMAGE_FILE_CHANNELS:
            raise DataError(f"the model takes {channels} channels and image files give 1 (grey) or 3 (RGB): give "
                            "`calib` preprocessed images as an .npz")
        folder = scan_image_folder(path)
        recipe = (preprocess or preprocess_from_preset()).for_input_size(spec.shape[2])
        indices = spread_indices(len(folder.files), count)
        chosen = [folder.files[i] for i in indices]
        images = np.stack([load_image(file, recipe, channels) for file in chosen]).astype(np.float32)
        held_files = tuple(folder.files[i] for i in unused_indices(len(folder.files), indices, holdout))
        held = np.stack([load_image(file, recipe, channels) for file in held_files]).astype(np.float32) if held_files else None
        return RealImages(images, tuple(chosen), path, holdout=held, holdout_files=held_files)
    if Path(path).suffix.lower() == ".npz":
        data = read_npz(path, pixels)
        return _from_array(data.images, spec, count, path, str(data.meta.get("method", "real")), data.holdout, holdout)
    raise DataError(f"`calib` must be a synthesis method ({', '.join(SynthMethod.values())}), an image folder or an "
                    f".npz file; got {path!r}")


def holds_out(source, count: int = 0, spare: int = 0, pixels: bool = False) -> bool:
    """Whether calibration ``source`` (not a method name) brings held-out samples: a SyntheticSet
    or an .npz with ``holdout``, or (``spare`` > 0) a source with ``spare`` images beside the
    ``count`` calibrated on, which :func:`load_real_images` holds out (an unreadable file is a
    one-line DataError)."""
    own, size = False, None
    if isinstance(source, SyntheticSet):
        own, size = source.holdout is not None, len(source.images)
    elif isinstance(source, np.ndarray):
        size = len(source)
    elif isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz" and os.path.isfile(source):
        data = read_npz(source, pixels)
        own, size = data.holdout is not None, len(data.images)
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        size = len(scan_image_folder(os.fspath(source)).files)
    return own or (size is not None and unused_indices(size, spread_indices(size, count), spare).size > 0)


def held_out_name(method: str) -> str:
    """What held-out samples of a calibration ``method`` are called in messages and reports."""
    return "held-out real images" if method == "real" else f"held-out {method} samples"


def _from_array(images, spec: InputSpec, count: int, source: str, method: str = "real", holdout=None,
                spare: int = 0, pixels: bool = False) -> RealImages:
    """``count`` of ``images`` (spread) to calibrate on; held out: ``holdout`` (a set's own),
    else ``spare`` of the rows not chosen (:func:`unused_indices`)."""
    images = _model_input(images, spec, source, "images", pixels)
    held = None if holdout is None else np.ascontiguousarray(_model_input(holdout, spec, source, "holdout", pixels),
                                                             np.float32)
    chosen = spread_indices(len(images), count)
    if held is None and (rows := unused_indices(len(images), chosen, spare)).size:
        held = np.asarray(images[rows], dtype=np.float32)
    return RealImages(np.asarray(images[chosen], dtype=np.float32), (), source, method, held)


def _model_input(images, spec: InputSpec, source: str, name: str, pixels: bool = False) -> np.ndarray:
    """``images`` checked and shaped as the model takes them (NCHW; uint8 pixels, taken with
    ``pixels``, as float32)."""
    check_images(source, images, name, pixels)
    images = as_floats(images)
    channels, height, width = spec.chw
    if images.ndim == 4 and tuple(images.shape[1:]) == (height, width, channels) != tuple(spec.chw):
        images = images.transpose(0, 3, 1, 2)  # channels last (a set written for an NHWC model): NCHW here
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(spec.chw):
        raise DataError(f"{source}: '{name}' has shape {images.shape}; the model takes N×{'×'.join(map(str, spec.chw))} "
                        f"(or N×{height}×{width}×{channels})")
    return images
