"""The whole-command functions of the Python API that are not a single stage's:
``inspect`` and ``synthesize`` (with its files). ``quantize`` and ``validate`` live with their
stages (:mod:`dsgonnx.pipeline`, :mod:`dsgonnx.validation`). Each mirrors one CLI command.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from .artifacts import SyntheticSet, check_output_folder
from .config import DEFAULT_HOLDOUT, SynthConfig, _is_int
from .errors import DataError


def inspect(model: str | os.PathLike, input_shape=None, parity_samples: int = 4) -> dict[str, Any]:
    """Load, convert and parity-check ``model``; a JSON-ready description (``dsgonnx inspect``).
    :func:`format_inspection` renders it as text."""
    from .inspection import inspect_model

    return inspect_model(model, input_shape, parity_samples)


def synthesize(model, config: Optional[SynthConfig] = None, *, holdout: int = DEFAULT_HOLDOUT, input_shape=None,
               output=None, preview=None, force: bool = False, **overrides) -> SyntheticSet:
    """Synthesize calibration images for ``model`` (a path, a loaded model or its torch twin)
    as ``config`` (or keyword overrides) says (``dsgonnx synthesize``).

    ``holdout``: synthesize that many samples more, together with the ``num_samples``
    calibration images, and keep them in the set's ``holdout`` (written to the ``.npz``):
    ``dsgonnx quantize --calib set.npz`` checks the models it weighs (reconstruction, QAT,
    SQuant's rounding against plain rounding) and validates without ``val_data`` on them, as
    it does on the samples it holds out when it synthesizes itself — the same split of the
    same images for the same seed.

    ``output``: also write the set to this ``.npz``; ``preview``: also write a PNG grid of the
    images. Both are checked before any work and written atomically; an existing file needs
    ``force``.
    """
    from . import distributed
    from .graph.onnx_io import load_model
    from .hardware import check_image_memory
    from .synth import synthesize as run_synthesis
    from .synth.preview import save_grid

    config = replace(config or SynthConfig(), **overrides)
    if not _is_int(holdout) or holdout < 0:
        raise DataError(f"`holdout` must be a whole number of samples, at least 0; got {holdout!r}")
    for path, suffix in ((output, ".npz"), (preview, ".png")):
        if path is None:
            continue
        path = Path(path)
        if path.suffix.lower() != suffix:
            raise DataError(f"`{'output' if suffix == '.npz' else 'preview'}` must be a {suffix} file, got {path.name!r}")
        check_output_folder(path)
        if path.exists() and not force:
            raise DataError(f"{path} exists; set `force` to overwrite it")
    # under torchrun: join the other ranks first, so that an error from here on stops them all
    distributed.join_device(config.device)
    if isinstance(model, (str, os.PathLike)):
        path = model
        model = distributed.together(lambda: load_model(path, input_shape))
    if holdout:  # (the synthesis counts them together, as `num_samples`)
        chw = getattr(model, "loaded", model).input.chw
        if None not in chw:
            check_image_memory(config.num_samples + holdout, chw, ("num_samples", "holdout"))
    result = run_synthesis(model, replace(config, num_samples=config.num_samples + holdout)).hold_out(holdout)
    if distributed.is_writer():  # rank 0 alone writes; every rank holds the whole set
        if output is not None:  # in the layout the model file takes
            loaded = getattr(model, "loaded", model)
            result.save(output, replace=force, layout=getattr(loaded, "layout", "NCHW"))
        if preview is not None:
            save_grid(result.images, preview, config.preprocess)
    return result
