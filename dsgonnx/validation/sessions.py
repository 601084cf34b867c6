"""ONNX Runtime sessions for the two models, the provider choice, and the shared input.

Why the care: the validation must run on the execution path that will run the model in
production and say which one actually ran. ONNX Runtime silently falls back to the CPU
when the CUDA provider cannot start (missing CUDA/cuDNN libraries, no GPU), so "CUDA is
available" (``get_available_providers``) proves nothing; only the providers a created
session reports (``session.get_providers()``) do.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from dsgonnx.config import Provider
from dsgonnx.errors import DsgonnxError, InputSpecError, ModelLoadError
from dsgonnx.graph.onnx_io import quantized_ops
from dsgonnx.inputs import InputSpec, format_dims
from dsgonnx.runtime import CPU, CUDA, ort_session, run_model

PROVIDER_CHOICES = Provider.values()

_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(uint8)": np.dtype(np.uint8),  # pixels the model normalises itself
}


@dataclass(frozen=True)
class ModelIO:
    """One model's image input and first output, as ONNX Runtime sees them.

    Shapes hold ints for fixed sizes and strings or None for dynamic ones. ONNX Runtime
    already leaves out graph inputs that are initializers (old-style graphs list their
    weights as inputs too), so the one remaining input is the image.
    """

    path: str
    input_name: str
    input_dtype: np.dtype
    input_shape: tuple
    output_name: str


@dataclass
class ModelRunner:
    """A session plus the facts the report needs about it."""

    io: ModelIO
    session: ort.InferenceSession

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, float]:
        """Outputs as float32 N×classes, and the wall time of the call in milliseconds."""
        start = time.perf_counter()
        (out,) = run_model(self.session, {self.io.input_name: batch}, self.io.path, [self.io.output_name])
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return flatten_classifier_output(np.asarray(out), self.io.path), elapsed_ms


def flatten_classifier_output(out: np.ndarray, path: str) -> np.ndarray:
    """N×C, N×C×1×1 or N×1×1×C -> float32 N×C; anything else is not a classifier output."""
    if out.ndim < 2 or sum(dim > 1 for dim in out.shape[1:]) > 1:
        raise InputSpecError(f"{path}: output shape {out.shape} is not a classifier's N×classes output")
    return out.reshape(out.shape[0], -1).astype(np.float32, copy=False)


def open_models(fp_path: str, q_path: str, provider: str, exact: bool = False) -> tuple[ModelRunner, ModelRunner]:
    """Sessions for both models on the requested provider; the quantized one follows the FP one.

    ``cuda`` must really run on CUDA (else :class:`DsgonnxError`, exit 2); ``auto`` uses
    CUDA when a session actually starts with it and the CPU otherwise. ``exact``: the
    quantized model's graph as written, without ORT's fused integer kernels.
    """
    if provider not in PROVIDER_CHOICES:
        raise DsgonnxError(f"`provider` must be one of {', '.join(PROVIDER_CHOICES)}, got {provider!r}")
    for path in (fp_path, q_path):
        _check_model_file(path)
    _check_order(fp_path, q_path)
    fp_session = _session_for_request(fp_path, provider)
    # Same execution path for both: whatever the FP session really got.
    providers = [CUDA, CPU] if CUDA in fp_session.get_providers() else [CPU]
    q_session = ort_session(q_path, providers, as_written=exact)
    if provider == "cuda" and CUDA not in q_session.get_providers():
        raise DsgonnxError(f"`provider` cuda: the CUDA provider did not start for {q_path}")
    return ModelRunner(read_model_io(fp_path, fp_session), fp_session), ModelRunner(read_model_io(q_path, q_session), q_session)


def read_model_io(path: str, session: ort.InferenceSession) -> ModelIO:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise InputSpecError(f"{path}: expected one image input, found {len(inputs)} ({names})")
    if not outputs:
        raise InputSpecError(f"{path}: the model has no outputs")
    (image,) = inputs
    if image.type not in _ORT_DTYPES:
        raise InputSpecError(f"{path}: input {image.name!r} is {image.type}; an image input must be float, float16, double or uint8")
    return ModelIO(
        path=path,
        input_name=image.name,
        input_dtype=_ORT_DTYPES[image.type],
        input_shape=tuple(image.shape),
        output_name=outputs[0].name,
    )


def shared_input(fp: ModelIO, q: ModelIO) -> InputSpec:
    """The input both models accept, or :class:`InputSpecError` (exit 2) when they differ.

    Name, element type and rank must be equal, and so must every size that both models fix;
    a size one model leaves dynamic takes the other's fixed value.
    """
    if (fp.input_name, fp.input_dtype) != (q.input_name, q.input_dtype) or len(fp.input_shape) != len(q.input_shape):
        raise InputSpecError(f"the models have different inputs: {_describe_io(fp)} vs {_describe_io(q)}")
    merged = []
    for a, b in zip(fp.input_shape, q.input_shape):
        fixed_a, fixed_b = isinstance(a, int) and a > 0, isinstance(b, int) and b > 0
        if fixed_a and fixed_b and a != b:
            raise InputSpecError(f"the models have different inputs: {_describe_io(fp)} vs {_describe_io(q)}")
        merged.append(a if fixed_a else b if fixed_b else None)
    if not merged:
        raise InputSpecError(f"{fp.path}: the image input {fp.input_name!r} is a scalar")
    return InputSpec(fp.input_name, tuple(merged), fp.input_dtype)


def _describe_io(io: ModelIO) -> str:
    return f"{io.input_name!r} {format_dims(io.input_shape)} {io.input_dtype.name} in {io.path}"


def _check_model_file(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    if not os.path.isfile(path):
        raise ModelLoadError(f"not a model file: {path}")


def _check_order(fp_path: str, q_path: str) -> None:
    """A quantized model given as the float one beside a float model given as the quantized one
    (the arguments swapped) would report every drop with its sign turned: refused. Two
    quantized models (one width against another) are compared as asked."""
    ops = {}
    for path in (fp_path, q_path):
        try:
            ops[path] = quantized_ops(onnx.load(path, load_external_data=False))
        except Exception:  # not a model onnx reads: the session says why
            return
    if ops[fp_path] and not ops[q_path]:
        raise InputSpecError(f"the models look swapped: {fp_path}, given as the float model, is quantized "
                             f"({ops[fp_path]}) and {q_path}, given as the quantized one, is not; the float model "
                             "comes first")


def _session_for_request(path: str, provider: str) -> ort.InferenceSession:
    if provider == "cpu":
        return ort_session(path, [CPU])
    if CUDA not in ort.get_available_providers():
        if provider == "cuda":
            raise DsgonnxError(
                "`provider` cuda: this onnxruntime build has no CUDA provider "
                f"(it has {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
            )
        return ort_session(path, [CPU])
    # ORT prints several lines to stderr when the CUDA libraries are missing and then falls
    # back to the CPU. Keep them off the user's terminal, and quote the reason if it matters.
    with _stderr_captured() as captured:
        session = ort_session(path, [CUDA, CPU])
    if provider == "cuda" and CUDA not in session.get_providers():
        reason = _cuda_failure_reason(captured.text)
        raise DsgonnxError(f"`provider` cuda: the CUDA provider is not usable here ({reason}); use `provider` auto or cpu")
    return session


class _Captured:
    text = ""


@contextlib.contextmanager
def _stderr_captured():
    """Redirect file descriptor 2 (where ORT's C++ logger writes) into a temporary file."""
    captured = _Captured()
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (rare embedded setups): capture nothing
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", errors="replace")


def _cuda_failure_reason(log: str) -> str:
    """The most telling line of ORT's log about why CUDA did not start (ANSI colours removed)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    for line in lines:
        if "cannot open shared object file" in line:  # e.g. "libcublasLt.so.13: cannot open shared object file: ..."
            return line.split("with error:")[-1].strip()
    for line in lines:
        if "CUDA" in line:
            return line.split("] ")[-1].strip()
    return "onnxruntime fell back to the CPU without saying why"
