"""Real calibration images: an image folder or an ``.npz``, a deterministic spread subset."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .graph.onnx_io import InputSpec
from .preprocess import Preprocess, check_images, load_image, load_npz, preprocess_from_preset, scan_image_folder


@dataclass
class RealImages:
    images: np.ndarray  # float32 NCHW, model input space
    files: tuple[str, ...]  # the image files used (empty for an .npz)
    source: str
    method: str = "real"  # a saved synthetic set (dsgonnx synthesize) keeps its method


def spread_indices(total: int, count: int) -> np.ndarray:
    """``count`` indices spread evenly over ``range(total)``: every k-th item from 0, so a
    class-sorted folder gives every class its share (1000 files, 100 wanted: 0, 10, 20...)."""
    if count >= total:
        return np.arange(total)
    stride = total // count
    return np.arange(count) * stride


def load_real_images(path: str, spec: InputSpec, count: int, preprocess: Preprocess | None) -> RealImages:
    """Up to ``count`` preprocessed images from ``path`` for calibration."""
    if not os.path.exists(path):
        raise DataError(f"calibration data not found: {path}")
    if os.path.isdir(path):
        folder = scan_image_folder(path)
        if not folder.files:
            raise DataError(f"no images found in {path}")
        recipe = (preprocess or preprocess_from_preset()).for_input_size(spec.shape[2])
        chosen = [folder.files[i] for i in spread_indices(len(folder.files), count)]
        images = np.stack([load_image(file, recipe) for file in chosen]).astype(np.float32)
        return RealImages(images, tuple(chosen), path)
    if path.lower().endswith(".npz"):
        images, _ = load_npz(path)
        check_images(path, images)
        if images.ndim != 4 or tuple(images.shape[1:]) != spec.chw:
            raise DataError(f"{path}: 'images' has shape {images.shape}; the model takes N×{'×'.join(map(str, spec.chw))}")
        if not np.issubdtype(images.dtype, np.floating):
            raise DataError(f"{path}: 'images' must be float (preprocessed), got {images.dtype}")
        chosen = spread_indices(len(images), count)
        return RealImages(images[chosen].astype(np.float32), (), path, _synthetic_method(path))
    raise DataError(f"--calib must be dsg, zeroq, gaussian, an image folder or an .npz file; got {path!r}")


def _synthetic_method(path: str) -> str:
    """The method recorded by ``dsgonnx synthesize`` in an .npz's meta, else ``real``."""
    import json

    with np.load(path, allow_pickle=False) as archive:
        if "meta" not in archive.files:
            return "real"
        try:
            return str(json.loads(str(archive["meta"])).get("method", "real"))
        except (ValueError, AttributeError):
            return "real"
