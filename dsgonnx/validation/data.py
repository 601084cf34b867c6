"""Validation data in the models' input form: image files, an .npz, or arrays in memory.

Images are decoded batch by batch (a thread pool overlaps JPEG decoding, which releases
the GIL), so a 50,000-image folder never sits in memory; arrays are sliced.
Every check that can fail on the user's data runs here, before any model is timed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from dsgonnx.errors import DataError, InputSpecError
from dsgonnx.preprocess import (
    IMAGE_FILE_CHANNELS,
    Preprocess,
    check_images,
    check_labels,
    for_input_type,
    load_image,
    preprocess_from_preset,
    read_class_list,
    read_npz,
    scan_image_folder,
)
from dsgonnx.progress import say
from dsgonnx.inputs import InputSpec, as_input_type, format_dims

DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class Dataset:
    """Samples ready for the models, plus what the report says about them."""

    kind: str  # "image-folder" (class sub-folders), "image-files" (flat folder), "npz", "in-memory"
    source: str | None
    size: int
    labels: np.ndarray | None
    classes: tuple[str, ...] = ()  # class folder names in label order (image-folder only)
    class_list: tuple[str, ...] | None = None  # the model's class names, when given
    preprocess: Preprocess | None = None  # resolved recipe (image files only)
    _load: Callable[[int, int], np.ndarray] = field(default=None, repr=False)

    def batch(self, start: int, stop: int) -> np.ndarray:
        return self._load(start, stop)

    def check_against_classes(self, num_classes: int) -> None:
        """Labels must fit the model's classes; class folders must match their number exactly."""
        if self.class_list is not None and len(self.class_list) != num_classes:
            raise DataError(f"the class list names {len(self.class_list)} classes but the models output {num_classes}")
        if self.kind == "image-folder" and self.class_list is None and len(self.classes) != num_classes:
            raise DataError(
                f"{self.source} has {len(self.classes)} class folders but the models output {num_classes} classes; "
                "labels would be wrong (give `class_list`, a file listing the model's classes to validate on a subset)"
            )
        if self.labels is not None:
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < 0 or high >= num_classes:
                bad = low if low < 0 else high
                where = self.source or "the labels in memory"
                raise DataError(f"label {bad} in {where} is out of range for a model with {num_classes} classes")

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "source": self.source,
            "num_samples": self.size,
            "labelled": self.labels is not None,
            "num_class_folders": len(self.classes) if self.kind == "image-folder" else None,
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
        }


def open_dataset(
    spec: InputSpec,
    data: str | None = None,
    preprocess: Preprocess | None = None,
    class_list: str | None = None,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    exclude_files: frozenset = frozenset(),
) -> Dataset:
    """The data source chosen by ``data`` (path) or ``images`` (array), checked against ``spec``."""
    if (data is None) == (images is None):
        if data is None:
            raise DataError("no data to validate on: give `data` (an image folder or an .npz file)")
        raise DataError("give either a data path or images in memory, not both")
    if labels is not None and images is None:
        raise DataError("labels in memory need images in memory")
    if images is not None:
        check_images("images in memory", images, pixels=spec.takes_pixels)
        if labels is not None:
            check_labels("images in memory", labels, len(images))
            labels = labels.astype(np.int64)
        return _array_dataset("in-memory", None, images, labels, spec)
    if not os.path.exists(data):
        raise DataError(f"data not found: {data}")
    if os.path.isdir(data):
        names = read_class_list(class_list) if class_list else None
        recipe = for_input_type(preprocess, spec.dtype, spec.name) or preprocess_from_preset()
        return _image_dataset(data, recipe, names, spec, exclude_files)
    if data.lower().endswith(".npz"):
        if class_list:
            raise DataError("`class_list` applies to image folders only, not to an .npz")
        npz = read_npz(data, pixels=spec.takes_pixels)
        if npz.labels is None and npz.holdout is not None:  # a synthetic set: its calibration images flatter the model
            say(f"validate: {data} is a set with held-out samples; scoring its {len(npz.holdout)} held-out samples, "
                f"not the {len(npz.images)} calibration images")
            return _array_dataset("npz", data, npz.holdout, None, spec)
        return _array_dataset("npz", data, npz.images, npz.labels, spec)
    raise DataError(f"`data` must be an image folder or an .npz file, got {data}")


def _array_dataset(kind: str, source: str | None, images: np.ndarray, labels, spec: InputSpec) -> Dataset:
    where = source or "images in memory"
    expected = format_dims(spec.shape[1:])
    if images.ndim != len(spec.shape) or any(
        want is not None and got != want for got, want in zip(images.shape[1:], spec.shape[1:])
    ):
        raise DataError(f"{where}: images have shape {images.shape}, the models take N×{expected}")
    images = as_input_type(images, spec.dtype)  # (pixels: their values were checked with the array's, check_images)
    return Dataset(kind, source, len(images), labels, _load=lambda start, stop: images[start:stop])


def _image_dataset(root: str, preprocess: Preprocess, class_names, spec: InputSpec,
                   exclude_files: frozenset = frozenset()) -> Dataset:
    if spec.layout is None:
        raise InputSpecError(
            f"input {spec.describe()} is not an N×3×H×W or N×H×W×3 image: give preprocessed images as an .npz"
        )
    channels = spec.shape[1] if spec.layout == "NCHW" else spec.shape[3]
    if channels not in IMAGE_FILE_CHANNELS:
        raise InputSpecError(f"input {spec.describe()} has {channels} channels and image files give 1 (grey) or 3 "
                             "(RGB): give preprocessed images as an .npz")
    recipe = preprocess.for_input_size(spec.image_size)
    folder = scan_image_folder(root, class_names)
    if exclude_files:
        excluded = {os.path.realpath(path) for path in exclude_files}
        kept = [i for i, path in enumerate(folder.files) if os.path.realpath(path) not in excluded]
        if not kept:
            raise DataError(f"{root}: every image was used for calibration; nothing is left to validate on")
        folder = replace(folder, files=tuple(folder.files[i] for i in kept),
                         labels=tuple(folder.labels[i] for i in kept) if folder.labelled else None)

    def load(start: int, stop: int) -> np.ndarray:
        paths = folder.files[start:stop]
        if len(paths) > 1 and DECODE_THREADS > 1:
            with ThreadPoolExecutor(DECODE_THREADS) as pool:
                arrays = list(pool.map(lambda path: load_image(path, recipe, channels), paths))
        else:
            arrays = [load_image(path, recipe, channels) for path in paths]
        batch = np.stack(arrays)
        if spec.layout == "NHWC":
            batch = batch.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(as_input_type(batch, spec.dtype))

    labels = np.asarray(folder.labels, dtype=np.int64) if folder.labelled else None
    kind = "image-folder" if folder.labelled else "image-files"
    return Dataset(kind, root, len(folder.files), labels, folder.classes, class_names, recipe, _load=load)
