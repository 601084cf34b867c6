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
from typing import Any

import numpy as np

from .errors import DataError
from .preprocess import read_npz


@dataclass
class SyntheticSet:
    """Calibration images (float32, NCHW, model input space) and how they were made."""

    images: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.float32:
            raise DataError(f"synthetic images must be float32 NCHW, got {self.images.dtype} {self.images.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: str | os.PathLike, replace: bool = True, layout: str = "NCHW") -> Path:
        """Write ``images`` and ``meta`` (a JSON string) to an ``.npz``, atomically (without
        ``replace``, never over an existing file); ``layout`` "NHWC" writes the images channels
        last, as a channels-last model takes them (``meta["layout"]`` says so)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise DataError(f"synthetic sets are saved as .npz, not {path.name!r}")
        images, meta = self.images, self.meta
        if layout == "NHWC":
            images, meta = np.ascontiguousarray(images.transpose(0, 2, 3, 1)), {**meta, "layout": "NHWC"}
        write_atomically(path, lambda handle: np.savez(handle, images=images, meta=np.array(json.dumps(meta))), replace)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticSet":
        data = read_npz(path)
        if data.images.ndim != 4 or data.images.dtype != np.float32:
            raise DataError(f"{path}: 'images' must be float32 NCHW, got {data.images.dtype} {data.images.shape}")
        images = data.images.transpose(0, 3, 1, 2) if data.meta.get("layout") == "NHWC" else data.images
        return cls(images=np.ascontiguousarray(images), meta=data.meta)


def check_output_folder(path: str | os.PathLike) -> Path:
    """The folder ``path`` will be written into; it must exist and be writable."""
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    if not folder.is_dir():
        raise DataError(f"output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise DataError(f"output folder is not writable: {folder}")
    return folder


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
