"""ONNX Runtime, set up once: every session dsgonnx creates, and ORT's quantization tools
kept quiet (imports onnxruntime, never torch).

* :func:`ort_session` is the one place a session is created — validation, the torch
  parity check, calibration checks and quantize's final check all go through it.
* :func:`quiet_ort` keeps ``onnxruntime.quantization`` off the user's terminal. Those tools
  ``print()`` progress to stdout (which may carry our JSON) and log through the root logger
  and their own ``onnxruntime.*`` loggers. For the duration of the call the latter are set to
  CRITICAL, and the root logger drops the records that come from onnxruntime's own files (not a global switch-off of logging, which would silence every library in
  every thread); their ``print()`` output has no switch, so stdout is redirected for the
  duration of the call — the one process-wide effect left, limited to these calls.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from typing import Optional

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


# ORT's optimizer quantizes a float Conv/Gemm weight that meets a dequantized input (int8,
# per tensor); models that keep a layer's weight float on purpose (analyze's probes) turn it off
KEEP_FLOAT_WEIGHTS = ("WeightBiasQuantization",)


def ort_session(path, providers=(CPU,), disabled_optimizers=(), as_written=False, shown_as=None):
    """An ``onnxruntime.InferenceSession`` for ``path``: errors only in ORT's log (its
    per-node placement warnings are noise here); a model ORT cannot load is a one-line
    :class:`~dsgonnx.errors.ModelLoadError`. ``disabled_optimizers``: ORT graph
    transformers not to run (``KEEP_FLOAT_WEIGHTS``). ``as_written``: no graph optimization
    at all, so a QDQ model runs as DequantizeLinear -> float op -> QuantizeLinear, the exact
    integer result (up to float rounding) whatever int8 kernels this CPU would pick.
    ``shown_as``: the file to name in that error where ``path`` is a private copy of it."""
    import onnxruntime as ort

    from .errors import ModelLoadError

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=list(providers),
                                    disabled_optimizers=list(disabled_optimizers))
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        failure = exc
    # a file of an IR version newer than this ORT reads (onnx's helper writes its own newest):
    # the same graph, its version number lowered, in memory (the file is not touched)
    lowered = _at_readable_ir(path)
    if lowered is not None:
        try:
            return ort.InferenceSession(lowered, options, providers=list(providers),
                                        disabled_optimizers=list(disabled_optimizers))
        except Exception as exc:
            failure = exc
    detail = one_line(failure)  # (ORT's message names the file it read)
    if shown_as is not None:
        detail = detail.replace(os.fspath(path), os.fspath(shown_as))
    raise ModelLoadError(f"cannot load ONNX model {shown_as or path}: {detail}") from None


def _runs_probe(opset: int, ir_version: int) -> bool:
    """Whether this onnxruntime loads a one-node (Identity) model of ``opset`` and ``ir_version``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=[CPU])
    except Exception:  # ORT's own exception types
        return False
    return True


@functools.lru_cache(maxsize=None)
def max_ir_version() -> int:
    """The newest ONNX IR version this onnxruntime loads (ORT has no call that says), from
    onnx's newest down (7: what opset 13, the probe's, needs)."""
    import onnx

    return next((v for v in range(onnx.IR_VERSION, 7, -1) if _runs_probe(13, v)), 7)


@functools.lru_cache(maxsize=None)
def max_opset() -> int:
    """The newest ai.onnx opset this onnxruntime runs, from onnx's newest down: onnx's newest
    may be one still under development, which ORT refuses."""
    import onnx

    return next((o for o in range(onnx.defs.onnx_opset_version(), 13, -1) if _runs_probe(o, max_ir_version())), 13)


def lower_ir_version(model) -> Optional[int]:
    """Set ``model``'s IR version to the newest this onnxruntime loads where it is newer; the
    version it had, or None where it was readable already. The graph is unchanged: a feature
    of the newer IR that the model uses is for the checker and ORT to refuse."""
    ceiling = max_ir_version()
    if model.ir_version <= ceiling:
        return None
    version, model.ir_version = model.ir_version, ceiling
    return version


def _at_readable_ir(path) -> Optional[bytes]:
    """The model at ``path`` serialised at an IR version this onnxruntime loads, or None where
    its version is not the trouble (or it cannot be read here: the session's error stands)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
        if model.ir_version <= max_ir_version():
            return None
        model = onnx.load(os.fspath(path))
        lower_ir_version(model)
        return model.SerializeToString()
    except Exception:
        return None


def run_model(session, feeds: dict, path, outputs=None) -> list:
    """``session.run`` on a model the user gave: where ONNX Runtime fails at run time (a node's
    inputs that do not fit, found only when it runs; bad shapes, kernels), that is the model's
    fault — a one-line :class:`~dsgonnx.errors.ModelLoadError`, not an internal error."""
    from .errors import ModelLoadError

    try:
        return session.run(outputs, feeds)
    except Exception as exc:  # ORT raises its own exception types
        raise ModelLoadError(f"ONNX Runtime cannot run {path}: {one_line(exc)}") from None


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _FromOnnxRuntime(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}onnxruntime{os.sep}" not in record.pathname


@contextlib.contextmanager
def quiet_ort():
    """Run ``onnxruntime.quantization`` calls without their prints and log records."""
    root, own = logging.getLogger(), logging.getLogger("onnxruntime")
    drop, level = _FromOnnxRuntime(), own.level
    root.addFilter(drop)  # their logging.warning(...) calls go to the root logger
    own.setLevel(logging.CRITICAL)  # and their module loggers (onnxruntime.quantization.*) inherit this
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop)
        own.setLevel(level)
