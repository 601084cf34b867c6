"""Image preprocessing presets and labelled-data loading (ImageFolder, ``.npz``).

Used by validation and, later, by calibration on real data and by synthesis: every stage
must feed the model exactly what its vendor trained it on, so the recipe lives in one
small frozen :class:`Preprocess` value.

Convention for ``mean`` / ``std`` (one for the whole package)
-------------------------------------------------------------
A decoded 8-bit pixel ``p`` (0–255) first becomes ``p / 255 * pixel_scale`` — so
``pixel_scale=1`` gives 0–1 pixels and ``pixel_scale=255`` keeps 0–255 — and then
``(x - mean) / std``. **mean and std are in the units set by pixel_scale**, listed per
channel **in the model's channel order** (for a BGR model, mean[0] is blue):

============  =============================================================  ===========
preset        recipe                                                          pixel_scale
============  =============================================================  ===========
imagenet      RGB, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)      1
inception     RGB, mean 0.5, std 0.5 (x/127.5 − 1)                            1
tf-lite       RGB, (x − 127) / 128                                            255
none          RGB, raw pixel values 0–255, no normalisation                   255
============  =============================================================  ===========

Geometry: the shorter side is resized to ``resize`` (bilinear, as torchvision's
``Resize(int)``), then a centred ``crop``×``crop`` square is cut (as ``CenterCrop``). The
crop follows the model's input size unless given; the resize, unless given, is
``floor(crop / crop_fraction)`` — 256 for a 224 crop with the usual 0.875 — and equals the
crop for ``none``. Explicit values always win over the preset: a CIFAR model that takes
its 32×32 images as they are uses ``resize=32, crop=32``.

Data sources
------------
* An **ImageFolder** directory: one sub-folder per class, the label is the position of the
  folder name in the sorted list of class folders (for ImageNet's WordNet-id folders this
  is the standard ImageNet-1k order). Images are found recursively below each class folder
  by extension; hidden entries (``.name``) and non-image files are ignored.
* A **flat folder** of images (no class sub-folders): unlabelled images.
* An **.npz** file with ``images`` (already preprocessed, in the model's input layout) and
  optionally ``labels`` (integer class indices), loaded with ``allow_pickle=False``. A set
  ``dsgonnx synthesize`` wrote may also hold ``holdout``: samples made with ``images`` and
  kept out of calibration, for quantize to check its models on.

Image files feed a model of 3 channels as RGB and a model of 1 channel as grey (PIL's luma);
other channel counts take an ``.npz``.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import asdict, dataclass, replace

import numpy as np

from dsgonnx.errors import DataError
from dsgonnx.inputs import is_pixel_type

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CHANNEL_ORDERS = ("RGB", "BGR")
IMAGE_FILE_CHANNELS = (1, 3)  # what a decoded image file gives a model: grey or RGB


def _channel_tuple(values, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a sequence of numbers, got {values!r}") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise DataError(f"{what} needs 3 finite per-channel values, got {_fmt(values)}")
    return values


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class Preprocess:
    """How an 8-bit RGB image becomes one model input (see the module docstring).

    ``crop=None`` means "the model's input size" and ``resize=None`` means
    ``floor(crop / crop_fraction)``; :meth:`for_input_size` fills both in.
    """

    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resize: int | None = None
    crop: int | None = None
    channel_order: str = "RGB"
    pixel_scale: float = 1.0
    crop_fraction: float = 0.875
    preset: str = "custom"

    def __post_init__(self):
        # frozen: normalise fields through object.__setattr__, as dataclasses document
        object.__setattr__(self, "mean", _channel_tuple(self.mean, "mean"))
        object.__setattr__(self, "std", _channel_tuple(self.std, "std"))
        if any(not s > 0 for s in self.std):  # a negative std would turn every image into its negative
            raise DataError(f"std must be positive (got {_fmt(self.std)})")
        order = str(self.channel_order).upper()
        if order not in CHANNEL_ORDERS:
            raise DataError(f"channel order must be RGB or BGR, got {self.channel_order!r}")
        object.__setattr__(self, "channel_order", order)
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise DataError(f"{name} must be a positive whole number of pixels, got {value!r}")
        if self.resize is not None and self.crop is not None and self.resize < self.crop:
            raise DataError(f"resize {self.resize} is smaller than crop {self.crop}: the crop would not fit")
        if not (isinstance(self.pixel_scale, (int, float)) and math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            raise DataError(f"pixel scale must be a positive number (1 or 255), got {self.pixel_scale!r}")
        if not 0 < self.crop_fraction <= 1:
            raise DataError(f"crop fraction must be in (0, 1], got {self.crop_fraction!r}")

    def for_input_size(self, size: int | None) -> Preprocess:
        """This recipe with ``crop`` and ``resize`` resolved for a model input of ``size`` pixels.

        ``size`` is the model's (square) input height/width, or None when it is dynamic.
        """
        crop = self.crop
        if crop is None:
            if size is None:
                raise DataError("the model's input height/width is dynamic: give the crop size (--crop N)")
            crop = size
        elif size is not None and crop != size:
            raise DataError(f"crop {crop} does not match the model's input size {size}×{size}")
        resize = self.resize if self.resize is not None else math.floor(crop / self.crop_fraction + 1e-9)
        if resize < crop:
            raise DataError(f"resize {resize} is smaller than crop {crop}: the crop would not fit")
        return replace(self, crop=crop, resize=resize)

    def apply(self, image, channels: int = 3) -> np.ndarray:
        """A PIL image -> float32 array C×H×W (call on a recipe from :meth:`for_input_size`):
        RGB for a model of 3 channels, grey (PIL's luma) for one of 1."""
        from PIL import Image

        if self.crop is None or self.resize is None:
            raise ValueError("resolve the recipe with for_input_size() before apply()")
        if channels not in IMAGE_FILE_CHANNELS:
            raise DataError(f"the model takes {channels} channels and image files give 1 (grey) or 3 (RGB): "
                            "give preprocessed images as an .npz")
        image = image.convert("RGB" if channels == 3 else "L")
        width, height = image.size
        short, long = sorted((width, height))
        if short != self.resize:
            new_long = int(self.resize * long / short)
            size = (self.resize, new_long) if width <= height else (new_long, self.resize)
            image = image.resize(size, Image.BILINEAR)
        width, height = image.size
        if width < self.crop or height < self.crop:
            raise DataError(f"image of {width}×{height} after resizing is smaller than the {self.crop}×{self.crop} crop")
        top = int(round((height - self.crop) / 2.0))
        left = int(round((width - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        pixels = np.asarray(image, dtype=np.float32).reshape(self.crop, self.crop, channels).transpose(2, 0, 1)  # C×H×W, 0-255
        return self.normalise(pixels[None])[0]

    def _channel_values(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """mean and std shaped (1, C, 1, 1) for a model with ``channels`` channels: a
        1-channel (grey) model takes the recipe's first channel."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if channels == 1:
            mean, std = mean[:1], std[:1]
        elif channels != len(mean):
            raise DataError(f"preprocessing has {len(mean)} channel values but the model takes {channels} channels")
        return mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """RGB 8-bit pixel values (N×C×H×W, 0–255) -> model inputs, float32 N×C×H×W."""
        pixels = np.asarray(pixels, np.float32)
        if self.channel_order == "BGR" and pixels.shape[1] == 3:
            pixels = pixels[:, ::-1]
        if self.pixel_scale != 255:
            pixels = pixels / np.float32(255.0 / self.pixel_scale)
        mean, std = self._channel_values(pixels.shape[1])
        return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)

    def denormalise(self, images: np.ndarray) -> np.ndarray:
        """Model inputs (N×C×H×W) -> RGB 8-bit pixel values (float, 0–255 for real images):
        the inverse of :meth:`normalise`."""
        mean, std = self._channel_values(images.shape[1])
        pixels = (np.asarray(images, np.float32) * std + mean) * np.float32(255.0 / self.pixel_scale)
        return pixels[:, ::-1] if self.channel_order == "BGR" and pixels.shape[1] == 3 else pixels

    def pixel_box(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (low, high) bounds, shaped (1, C, 1, 1), of real images in the model's
        input space: where pixels 0 and 255 land."""
        low = self.normalise(np.zeros((1, channels, 1, 1), np.float32))
        high = self.normalise(np.full((1, channels, 1, 1), 255.0, np.float32))
        return np.minimum(low, high), np.maximum(low, high)

    def to_dict(self) -> dict:
        return asdict(self) | {"mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> str:
        """One short line for tables and logs."""
        return (
            f"{self.preset}: resize {self.resize}, crop {self.crop}, {self.channel_order} "
            f"0-{self.pixel_scale:g}, mean {_fmt(self.mean)}, std {_fmt(self.std)}"
        )


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), pixel_scale=1.0, preset="imagenet"),
    "inception": Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pixel_scale=1.0, preset="inception"),
    "tf-lite": Preprocess(mean=(127.0,) * 3, std=(128.0,) * 3, pixel_scale=255.0, preset="tf-lite"),
    "none": Preprocess(pixel_scale=255.0, crop_fraction=1.0, preset="none"),
}
DEFAULT_PRESET = "imagenet"


def for_input_type(preprocess: Preprocess | None, dtype, name: str) -> Preprocess | None:
    """The recipe for a model whose image input ``name`` is of ``dtype``: ``preprocess`` itself
    for a float input; for an 8-bit one, whose pixels the model normalises itself, ``none``'s
    raw 0–255 values where nothing was given, and :class:`DataError` where ``preprocess``
    would normalise them (its values would not be pixels; cast to 8 bits they are noise)."""
    if not is_pixel_type(dtype):
        return preprocess
    if preprocess is None:
        return PRESETS["none"]
    if preprocess.pixel_scale != 255 or any(m != 0 for m in preprocess.mean) or any(s != 1 for s in preprocess.std):
        raise DataError(f"input '{name}' is {np.dtype(dtype).name}: the model takes pixels 0-255 as they are and "
                        f"normalises them itself, but the preprocessing given ({preprocess.describe()}) changes "
                        "them: leave it out, or give --preprocess none (with --resize, --crop or --channel-order as needed)")
    return preprocess


def preprocess_from_preset(
    preset: str | None = None,
    *,
    resize: int | None = None,
    crop: int | None = None,
    mean=None,
    std=None,
    channel_order: str | None = None,
    pixel_scale: float | None = None,
) -> Preprocess:
    """The named preset (default ``imagenet``) with any explicit value overriding it.

    ``mean`` / ``std`` may be a sequence or a string ``"a,b,c"`` (one value is used for all
    three channels); they are in the units of the resulting ``pixel_scale``.
    """
    name = (preset or DEFAULT_PRESET).lower()
    if name not in PRESETS:
        raise DataError(f"unknown preprocessing preset {preset!r} (choose from {', '.join(PRESETS)})")
    overrides = {
        "resize": resize,
        "crop": crop,
        "mean": parse_channel_values(mean, "mean") if isinstance(mean, str) else mean,
        "std": parse_channel_values(std, "std") if isinstance(std, str) else std,
        "channel_order": channel_order,
        "pixel_scale": pixel_scale,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    return replace(PRESETS[name], **overrides)


def parse_channel_values(text: str, what: str = "value") -> tuple[float, float, float]:
    """``"0.485,0.456,0.406"`` -> a 3-tuple; ``"0.5"`` -> the same value for each channel."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        raise DataError(f"{what} must be one number or three comma-separated numbers, got {text!r}") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise DataError(f"{what} must be one number or three comma-separated finite numbers, got {text!r}")
    return values * 3 if len(values) == 1 else values


def load_image(path: str, preprocess: Preprocess, channels: int = 3) -> np.ndarray:
    """Decode one image file and preprocess it for a model of ``channels`` channels (see
    :meth:`Preprocess.apply`); any decoding failure names the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return preprocess.apply(image, channels)
    except DataError as exc:
        raise DataError(f"image {path}: {exc}") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class ImageFolder:
    """Image files found under a folder and, for class sub-folders, their labels."""

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...] | None  # None: a flat folder of unlabelled images
    classes: tuple[str, ...]  # class folder names in label order; () when unlabelled

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def scan_image_folder(root: str, class_names: list[str] | tuple[str, ...] | None = None) -> ImageFolder:
    """List the images under ``root`` (see the module docstring for the layouts).

    With ``class_names`` (the model's classes in output order), each class folder's label is
    the position of its name in that list instead of in the sorted folder names, so a
    folder holding a subset of the classes is labelled correctly.
    """
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    entries = _visible_entries(root)
    class_dirs = sorted(name for name in entries if os.path.isdir(os.path.join(root, name)))
    top_images = sorted(name for name in entries if _is_image(os.path.join(root, name)))
    if class_dirs and top_images:
        raise DataError(
            f"{root} holds both class folders and loose images (e.g. {top_images[0]}): "
            "use class sub-folders for labelled data or a flat folder for unlabelled data"
        )
    if not class_dirs:
        if not top_images:
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return ImageFolder(root, tuple(os.path.join(root, name) for name in top_images), None, ())

    if class_names is None:
        index = {name: i for i, name in enumerate(class_dirs)}
    else:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = [name for name in class_dirs if name not in index]
        if unknown:
            raise DataError(f"class folder {unknown[0]!r} is not in the class list ({len(unknown)} unknown folders)")
    files, labels = [], []
    for name in class_dirs:
        found = _images_below(os.path.join(root, name))
        if not found:
            raise DataError(f"class folder {os.path.join(root, name)} has no images")
        files.extend(found)
        labels.extend([index[name]] * len(found))
    return ImageFolder(root, tuple(files), tuple(labels), tuple(class_dirs))


def read_class_list(path: str) -> tuple[str, ...]:
    """Class names, one per line, in the model's output order (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as handle:
            names = tuple(line.strip() for line in handle if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read class list {path}: {exc}") from None
    if not names:
        raise DataError(f"class list {path} is empty")
    if len(set(names)) != len(names):
        raise DataError(f"class list {path} names a class twice")
    return names


@dataclass(frozen=True)
class NpzData:
    """What an .npz holds for dsgonnx: ``images``, optional ``labels``, ``meta`` (the JSON
    record ``dsgonnx synthesize`` writes; ``{}`` when absent) and ``holdout`` (synthetic
    samples kept out of calibration; None when absent)."""

    images: np.ndarray
    labels: np.ndarray | None
    meta: dict
    holdout: np.ndarray | None = None


def read_npz(path: str | os.PathLike, pixels: bool = False) -> NpzData:
    """The one .npz reader: ``images`` (floating, N×…), ``labels`` (integer, N), ``meta`` and
    ``holdout`` (floating, M×… as ``images``), loaded with ``allow_pickle=False``; anything
    else is a one-line DataError. ``pixels`` (a model that takes uint8 pixels): uint8 images
    are taken too, as float32 values 0-255."""
    import json

    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if magic != b"PK\x03\x04":  # otherwise numpy would try (and refuse) to unpickle it
        raise DataError(f"{path} is not an .npz file (numpy.savez zip archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path} has no 'images' array (found: {', '.join(archive.files) or 'nothing'})")
            images = archive["images"]
            labels = archive["labels"] if "labels" in archive.files else None
            meta = json.loads(str(archive["meta"])) if "meta" in archive.files else {}
            holdout = archive["holdout"] if "holdout" in archive.files else None
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # JSONDecodeError is a ValueError
        raise DataError(f"cannot read {path} as .npz: {exc}") from None
    check_images(path, images, pixels=pixels)
    if labels is not None:
        check_labels(path, labels, len(images))
        labels = labels.astype(np.int64)
    if holdout is not None:
        check_images(path, holdout, "holdout", pixels=pixels)
        if holdout.shape[1:] != images.shape[1:]:
            raise DataError(f"{path}: 'holdout' has shape {holdout.shape}; its samples must be shaped as "
                            f"'images' ({'×'.join(map(str, images.shape[1:]))})")
    images, holdout = (as_floats(array) if array is not None else None for array in (images, holdout))
    return NpzData(images, labels, meta if isinstance(meta, dict) else {}, holdout)


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``images`` and ``labels`` (None when absent) of :func:`read_npz`."""
    data = read_npz(path)
    return data.images, data.labels


def as_floats(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (what :func:`check_images` takes with ``pixels``) as float32; floats as they are."""
    return images.astype(np.float32) if images.dtype == np.uint8 else images


def check_images(path: str, images: np.ndarray, name: str = "images", pixels: bool = False) -> None:
    """Preprocessed images must be a non-empty floating N×… array of finite values. With
    ``pixels`` (a model that takes uint8 pixels) a uint8 array is taken too, and floating
    values must be pixels 0-255: values outside (images preprocessed for a float model) or
    all within 0-1 with fractions (pixels scaled to 0-1, which would round to black) are refused."""
    if pixels and isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim >= 2 and len(images):
        return
    if not isinstance(images, np.ndarray) or not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{path}: '{name}' must be floating point (already preprocessed), got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim < 2 or len(images) == 0:
        raise DataError(f"{path}: '{name}' must be N×… with N ≥ 1, got shape {images.shape}")
    if not np.isfinite(images).all():
        raise DataError(f"{path}: '{name}' contains NaN or infinite values")
    if pixels:
        low, high = float(images.min()), float(images.max())
        if low < -0.5 or high > 255.5:  # (values a rounding would change beyond the half are no pixels)
            raise DataError(f"{path}: the model takes uint8 pixels 0-255, and '{name}' holds values from {low:.4g} to "
                            f"{high:.4g} (preprocessed for a float model?)")
        if high <= 1 and not np.array_equal(images, np.rint(images)):
            raise DataError(f"{path}: the model takes uint8 pixels 0-255, and '{name}' holds values from {low:.4g} to "
                            f"{high:.4g} only (pixels scaled to 0-1? multiply them by 255)")


def check_labels(path: str, labels: np.ndarray, count: int) -> None:
    """Labels must be N integers, one per image (their range is checked against the model)."""
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be integers, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != (count,):
        raise DataError(f"{path}: 'labels' must have shape ({count},) to match 'images', got {labels.shape}")


def _visible_entries(folder: str) -> list[str]:
    try:
        return [name for name in os.listdir(folder) if not name.startswith(".")]
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc}") from None


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def _images_below(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".") and _is_image(os.path.join(dirpath, f)))
    return found
