"""Numpy-only hand-offs between stages, each saved and loaded as a file.

A :class:`SyntheticSet` is what synthesis produces and calibration consumes: images in
the model's input space plus a JSON ``meta`` record of how they were made. It imports no
torch, so a saved set can be quantized and validated without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from .errors import DataError
from .preprocess import read_npz


@dataclass
class SyntheticSet:
    """Calibration images (float32, NCHW, model input space), how they were made, and
    ``holdout``: samples made with them but kept out of calibration (None: none), on which
    quantize checks the models it weighs (a model fitted to the calibration images looks
    better on them than it is)."""

    images: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    holdout: Optional[np.ndarray] = None

    def __post_init__(self):
        for name, images in (("images", self.images), ("holdout", self.holdout)):
            if images is not None and (images.ndim != 4 or images.dtype != np.float32):
                raise DataError(f"synthetic {name} must be float32 NCHW, got {images.dtype} {images.shape}")
        if self.holdout is not None and self.holdout.shape[1:] != self.images.shape[1:]:
            raise DataError(f"held-out samples {self.holdout.shape} are not shaped as the images {self.images.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def hold_out(self, count: int) -> "SyntheticSet":
        """The set with its last ``count`` images moved to ``holdout`` (``meta["holdout"]``
        counts them): synthesized together with the calibration images, never calibrated on."""
        if count <= 0:
            return self
        if count >= len(self.images):
            raise DataError(f"cannot hold out {count} of {len(self.images)} synthetic samples: none would be left")
        meta = {**self.meta, "holdout": count}
        if isinstance(meta.get("target_classes"), list):  # one per sample (inversion, cross-entropy): split too
            meta["target_classes"], meta["holdout_target_classes"] = (meta["target_classes"][:-count],
                                                                      meta["target_classes"][-count:])
        return SyntheticSet(self.images[:-count], meta, self.images[-count:])

    def save(self, path: str | os.PathLike, replace: bool = True, layout: str = "NCHW") -> Path:
        """Write ``images``, ``holdout`` (when there are some) and ``meta`` (a JSON string) to an
        ``.npz``, atomically (without ``replace``, never over an existing file); ``layout``
        "NHWC" writes the images channels last, as a channels-last model takes them
        (``meta["layout"]`` says so)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise DataError(f"synthetic sets are saved as .npz, not {path.name!r}")
        arrays = {"images": self.images, **({"holdout": self.holdout} if self.holdout is not None else {})}
        meta = self.meta
        if layout == "NHWC":
            arrays = {name: np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for name, a in arrays.items()}
            meta = {**meta, "layout": "NHWC"}
        write_atomically(path, lambda handle: np.savez(handle, **arrays, meta=np.array(json.dumps(meta))), replace)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticSet":
        data = read_npz(path)
        arrays = {}
        for name, images in (("images", data.images), ("holdout", data.holdout)):
            if images is None:
                continue
            if images.ndim != 4 or images.dtype != np.float32:
                raise DataError(f"{path}: '{name}' must be float32 NCHW, got {images.dtype} {images.shape}")
            arrays[name] = np.ascontiguousarray(images.transpose(0, 3, 1, 2) if data.meta.get("layout") == "NHWC"
                                                else images)
        return cls(meta=data.meta, **arrays)


def check_output_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` will be written into; it must exist and take a new file, ``path``'s
    temporary file (:func:`write_atomically`) among them."""
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise DataError(f"output folder does not exist: {folder}")
    why = cannot_create_in(folder)
    if why is not None:
        raise DataError(f"output folder is not writable: {folder} ({why})")
    why = name_too_long(path)
    if why is not None:
        raise DataError(why)
    return folder


# what a temporary file's name adds to its file's: ".", ".", mkstemp's 8 characters, ".tmp.onnx"
_TEMP_NAME_EXTRA = 1 + 1 + 8 + len(".tmp.onnx")


def name_too_long(path: str | os.PathLike) -> Optional[str]:
    """Why the folder of ``path`` cannot hold a file of its name and that file's temporary
    twin, or None where it can (the name's length against the file system's limit)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not every system reports it
        limit = 255
    size = len(os.fsencode(Path(path).name))
    if size + _TEMP_NAME_EXTRA > limit:
        return (f"file name too long: {Path(path).name[:32]}… is {size} bytes; {folder} takes names of at most "
                f"{limit - _TEMP_NAME_EXTRA} here (with room for its temporary file)")
    return None


def same_file(path: str | os.PathLike, others: Mapping[str, Any]) -> Optional[str]:
    """Which of ``others`` (what each is -> its path; None or a value that is no path is skipped)
    ``path`` names, the same file by its resolved path (links followed), or None."""
    target = Path(path).resolve()
    for what, other in others.items():
        if isinstance(other, (str, os.PathLike)) and str(other) and Path(other).resolve() == target:
            return what
    return None


def cannot_create_in(folder: str | os.PathLike) -> Optional[str]:
    """Why no new file can be made in the existing ``folder``, or None where one can. Tried, not
    read from the permission bits: they allow root everything, also on a read-only or pseudo
    file system (/proc), where the model would fail to write only after all the work."""
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".dsgonnx-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(handle)
    os.unlink(probe)
    return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(tmp: str | os.PathLike, path: str | os.PathLike, replace: bool = True) -> None:
    """Move the finished temporary file ``tmp`` (in ``path``'s folder) to ``path``: its bytes
    on disk first (fsync), the permissions a new file gets under the umask (not mkstemp's
    0600), and — without ``replace`` — never over a file that appeared while dsgonnx worked
    (exclusive: a hard link fails where the name exists)."""
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise DataError(f"{path} appeared while dsgonnx was working; not overwritten (set `force`)") from None
        except OSError:  # no hard links on this file system: check, then rename
            if os.path.exists(path):
                raise DataError(f"{path} appeared while dsgonnx was working; not overwritten (set `force`)") from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # the rename itself on disk (not every system can open a folder)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def write_atomically(path: Path, write, replace: bool = True) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then :func:`publish` it.

    Nothing is left behind on failure, and readers never see a half-written file.
    """
    path = Path(path)
    folder = check_output_folder(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        publish(tmp, path, replace)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
