"""Converters dsgonnx adds in front of onnx2torch's.

onnx2torch 1.5.x registers converters up to about opset 17 and misses some opset-1..7
versions. Each module here covers one op family; importing it adds its converters to
dsgonnx's own table (:func:`._common.lookup` consults it before onnx2torch's registry,
which is never written, so other users of onnx2torch in the process are unaffected).
Call :func:`register_all` before converting; it is idempotent.
"""

from __future__ import annotations

import importlib

_FAMILIES = ("passthrough", "cast", "reshape", "reduce", "pad", "split", "resize", "legacy", "activation", "linear")
_registered = False


def register_all() -> None:
    """Import every family module once (each registers its converters on import)."""
    global _registered
    if not _registered:
        for family in _FAMILIES:
            importlib.import_module(f"{__name__}.{family}")
        _registered = True
