"""Load an ONNX classifier safely and find its image input.

``load_model`` is the single entry point: it reads the file (external data confined to
the model's folder), runs ``onnx.checker`` and shape inference, finds the one image
input (4-D float, or 8-bit pixels), resolves dynamic dimensions, and counts the classes. The
file is read once: later stages read private copies in a temporary folder
(``LoadedModel.path``, ``original``); a channels-last (NHWC) model is worked on through a
channels-first twin (:mod:`.layout`), and one that takes uint8 pixels through a twin that takes
them as float32 (:func:`float_input_twin`); ``LoadedModel.file`` stays the user's file, for
names and messages.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, external_data_helper, helper, numpy_helper, shape_inference

from ..errors import InputSpecError, ModelLoadError, UnsupportedModelError
from ..inputs import (IMAGE_CHANNELS, INTEGER_INPUT_TYPES, InputSpec, as_input_type, is_pixel_type, layout_of,
                      parse_input_shape)
from ..preprocess import Preprocess, for_input_type
from ..progress import say
from .layout import channels_first_twin

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_INTEGER_TYPES = {helper.np_dtype_to_tensor_dtype(dtype) for dtype in INTEGER_INPUT_TYPES}


@dataclass
class LoadedModel:
    """A checked ONNX model with its resolved image input (external data in memory)."""

    path: Path
    model: onnx.ModelProto
    sha256: str
    input: InputSpec
    output_names: list[str]
    num_classes: Optional[int]
    opset: int
    producer: str
    op_histogram: dict[str, int] = field(default_factory=dict)
    has_external_data: bool = False
    file: Optional[Path] = None  # the user's file (``path`` is a private copy of what was read, or its twin)
    original: Optional[Path] = None  # a private copy of the bytes read (external data inlined)
    layout: str = "NCHW"  # the file's input layout; ``input`` and ``model`` are always NCHW
    # the file's input type where ``model`` is a float32 twin of a float16 file (:func:`quantizable`)
    # or of a uint8 one (:func:`float_input_twin`, at load), and the graph outputs the file gives
    # in float16
    file_dtype: Optional[np.dtype] = None
    float16_outputs: tuple[str, ...] = ()
    # the batch the file fixes where ``model`` is a twin that takes any (:func:`quantizable`)
    file_batch: Optional[int] = None
    # the file's IR version where it is newer than ONNX Runtime reads, and ``model`` and the
    # private copies carry the newest it does (:func:`load_model`)
    file_ir_version: Optional[int] = None
    _scratch: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False, compare=False)

    @property
    def takes_pixels(self) -> bool:
        """Whether ``model`` is the float32 twin of a file that takes whole (uint8) pixels."""
        return self.file_dtype is not None and is_pixel_type(self.file_dtype)

    def preprocess_for(self, preprocess: Optional[Preprocess]) -> Optional[Preprocess]:
        """The recipe this model's images take: ``preprocess`` itself, or where the file takes
        whole pixels the checked recipe for them (:func:`~dsgonnx.preprocess.for_input_type`)."""
        return for_input_type(preprocess, self.file_dtype, self.input.name) if self.takes_pixels else preprocess

    @property
    def initializer_names(self) -> set[str]:
        return {t.name for t in self.model.graph.initializer}

    @property
    def source(self) -> Path:
        """The user's model file, for names and messages; it is read once, at load: every
        later stage reads ``path`` (or ``original``), private copies of those bytes."""
        return self.file or self.path

    def in_file_layout(self, images: np.ndarray) -> np.ndarray:
        """NCHW ``images`` as the file takes them (NHWC for a channels-last model; float16 for a
        float16 file worked on through a float32 twin; rounded to whole uint8 pixels for a
        uint8 one)."""
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if self.layout == "NHWC" else images
        return as_input_type(images, self.file_dtype) if self.file_dtype is not None else images


def load_model(path: str | os.PathLike, input_shape: Optional[tuple[int, int, int, int] | str] = None) -> LoadedModel:
    """Load, check and describe the classifier at ``path``.

    ``input_shape`` (NCHW) fixes dynamic dimensions and must agree with static ones.
    Raises :class:`ModelLoadError` / :class:`InputSpecError` with a one-line message.
    """
    path = Path(path)
    if isinstance(input_shape, str):
        input_shape = parse_input_shape(input_shape)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path}")
    model, data = _read_proto(path)
    has_external = _load_external_data(model, path)
    _check(model, path)
    file_ir = _readable_ir(model, path)
    _check_opset(model, path)
    _check_values(model, path)
    _check_float(model, path)
    spec, layout = _image_input(model, input_shape)
    _check_size(spec)
    histogram = dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))
    # the file is read once: every later stage (ORT's tools, sessions) reads private copies,
    # so a file replaced meanwhile cannot mix two models into one result
    scratch = tempfile.TemporaryDirectory(prefix="dsgonnx-model-")
    original = Path(scratch.name) / path.name
    if has_external or file_ir is not None:
        _save(model, original)
    else:
        original.write_bytes(data)
    twin = file_dtype = None
    if spec.dtype in INTEGER_INPUT_TYPES:  # 8-bit pixels: worked on as float32 ones
        file_dtype, spec = spec.dtype, replace(spec, dtype=np.dtype(np.float32))
        model = float_input_twin(model, spec.name)
    if layout == "NHWC":
        try:
            model = channels_first_twin(model, spec.name)
        except ValueError as exc:
            raise InputSpecError(f"input '{spec.name}' (NHWC) cannot be given a channels-first twin: {exc}") from None
    model = _infer_shapes(_with_input_shape(model, spec), path)
    _check_scores(model)
    if layout == "NHWC" or file_dtype is not None:  # the stages that read a file (ORT's tools) read the twin
        twin = Path(scratch.name) / f"{path.stem}.twin.onnx"
        _save(model, twin)
    if file_dtype is not None:
        _check_float_twin(original, twin, spec, layout, file_dtype, path)
    return LoadedModel(
        path=twin or original,
        file=path,
        original=original,
        layout=layout,
        _scratch=scratch,
        model=model,
        sha256=hashlib.sha256(data).hexdigest(),
        input=spec,
        output_names=[o.name for o in model.graph.output],
        num_classes=_num_classes(model),
        opset=opset_of(model),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        op_histogram=histogram,
        has_external_data=has_external,
        file_ir_version=file_ir,
        file_dtype=file_dtype,
    )


def float_input_twin(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """``model`` with its integer image input ``name`` typed float32 (a copy): the model's own
    Cast of it to float then casts float to float, so the twin computes on whole pixel values
    what the file does (:func:`_check_float_twin` runs both), and calibration, synthesis and
    the torch conversion see an ordinary float model. The inferred types are dropped (tensors
    computed from the input before its Cast change type too) and inferred again."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    next(v for v in twin.graph.input if v.name == name).type.tensor_type.elem_type = TensorProto.FLOAT
    del twin.graph.value_info[:]
    return twin


PIXEL_HALF_RANGE = 127.5  # a unit-pixel twin takes u = p / 127.5 - 1 (:func:`unit_pixel_twin`)


def unit_pixel_twin(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` (a twin that takes pixels 0-255, :func:`float_input_twin`) taking them as
    ``u = p / 127.5 - 1`` instead (the ``inception`` preset's values): a Mul and an Add in
    front of the graph give it ``p = 127.5 u + 127.5``. Synthesis optimises images on the scale
    of normalised inputs (its step size, priors and noise assume about unit spread); on raw
    pixels 100 steps would move them a few levels from black. The model and file are private
    to the returned value (``loaded`` is not touched)."""
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    name, pixels = loaded.input.name, f"{loaded.input.name}__pixels"
    for node in model.graph.node:
        for index, value in enumerate(node.input):
            if value == name:
                node.input[index] = pixels
    half = numpy_helper.from_array(np.array(PIXEL_HALF_RANGE, np.float32), f"{name}__half_range")
    model.graph.initializer.extend([half])
    model.graph.node.insert(0, helper.make_node("Add", [f"{name}__scaled", half.name], [pixels], name=f"{name}__to_pixels"))
    model.graph.node.insert(0, helper.make_node("Mul", [name, half.name], [f"{name}__scaled"], name=f"{name}__scale"))
    path = Path(loaded._scratch.name) / f"{loaded.source.stem}.unit.onnx"
    _save(model, path)
    return replace(loaded, model=model, path=path)


def from_unit_pixels(images: np.ndarray) -> np.ndarray:
    """Images a :func:`unit_pixel_twin` takes, as the whole pixels 0-255 the file is given
    (float32)."""
    half = np.float32(PIXEL_HALF_RANGE)
    return np.rint(np.clip(images * half + half, 0, 255))


def _check_float_twin(original: Path, twin: Path, spec: InputSpec, layout: str, dtype: np.dtype, path: Path) -> None:
    """The twin gives what the file gives on the same whole pixel values (two random images,
    in ONNX Runtime), or :class:`InputSpecError`: the graph reads its input as integers
    before or past its Cast to float (a bit shift, a comparison of integers), which a float
    input would change or refuse."""
    from ..runtime import ort_session

    batch = spec.fixed_batch or 2
    info = np.iinfo(dtype)
    images = np.random.default_rng(0).integers(info.min, int(info.max) + 1, (batch, *spec.shape[1:])).astype(np.float32)
    in_file = np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if layout == "NHWC" else images
    file_out = ort_session(original, shown_as=path).run(None, {spec.name: in_file.astype(dtype)})
    try:
        twin_out = ort_session(twin, shown_as=path).run(None, {spec.name: images})
    except Exception as exc:
        raise InputSpecError(f"input '{spec.name}' is {dtype.name}, and the model cannot take it as float32 pixels "
                             f"({str(exc).splitlines()[0]}); dsgonnx works on float models") from None
    for a, b in zip(file_out, twin_out):
        if not _computes_alike(a, b):
            raise InputSpecError(f"input '{spec.name}' is {dtype.name}, and the model computes otherwise on the same "
                                 "pixels given as float32 (it computes on them as integers); dsgonnx "
                                 "works on float models")


def _readable_ir(model: onnx.ModelProto, path: Path) -> Optional[int]:
    """Where ``model``'s IR version is newer than ONNX Runtime reads (onnx's ``helper.make_model``
    writes onnx's newest), lower it to the newest ORT does and check the model there; the
    file's version, or None where it was readable."""
    import onnxruntime

    from ..runtime import lower_ir_version

    version = lower_ir_version(model)
    if version is None:
        return None
    try:
        if model.ByteSize() < 2**31 - 1:  # (beyond protobuf's 2 GB the file was checked as it is)
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: IR version {version} is newer than ONNX Runtime {onnxruntime.__version__} reads "
                             f"(up to {model.ir_version}), and the model does not check at IR {model.ir_version}: "
                             f"{first}") from None
    return version


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    """An opset newer than ONNX Runtime runs (onnx's newest can be one under development) is
    refused here: quantize got as far as calibration, after the synthesis, and stopped there."""
    import onnxruntime

    from ..runtime import max_opset

    opset = opset_of(model)
    if opset > max_opset():
        raise ModelLoadError(f"{path}: opset {opset} is newer than ONNX Runtime {onnxruntime.__version__} runs (up to "
                             f"{max_opset()}); export the model at opset {max_opset()} or lower")


# QuantizeLinear/DequantizeLinear take a per-channel axis from opset 13 on
QDQ_OPSET = 13


def quantizable(loaded: LoadedModel, any_batch_twin: bool = False) -> LoadedModel:
    """``loaded`` as ONNX Runtime's quantization tools take it: a float16 file is worked on
    through a float32 twin (``file_dtype`` keeps the file's type, and
    :func:`dsgonnx.graph.normalize.file_interface` puts it back on the quantized model), and
    an opset below :data:`QDQ_OPSET` is converted to it by ``onnx.version_converter`` (the op
    semantics that changed, e.g. Softmax's axis at 13, are rewritten; ORT's tools would only
    raise the version number), IR version 7, initializers no longer listed as graph inputs.
    ``loaded`` itself when it needs neither. With ``any_batch_twin`` (reconstruction and QAT
    run batches of their own size through the torch twin of ORT's pre-processed model), a file
    that fixes its batch is worked on through a twin that takes any where that twin computes
    each sample as the file does (:func:`_any_batch_twin`): ORT's pre-processing would
    otherwise write the fixed batch into the graph (a MatMul+Add fused to Gemm between
    Reshapes to [batch·tokens, C]). Raises :class:`UnsupportedModelError` where the
    conversion fails."""
    from ..errors import UnsupportedModelError
    from .normalize import drop_initializer_inputs, float16_to_float32

    half = loaded.input.dtype == np.float16
    free = any_batch_twin and loaded.input.fixed_batch is not None and loaded.opset >= QDQ_OPSET
    if not half and loaded.opset >= QDQ_OPSET and not free:
        return loaded
    batch = loaded.input.shape[0] if loaded.opset < QDQ_OPSET else None
    model = onnx.ModelProto()
    model.CopyFrom(loaded.model)
    if half:
        float16_to_float32(model.graph)
    if free:
        twin = _any_batch_twin(model, loaded.input.name, Path(loaded._scratch.name))
        if twin is not None:
            model, batch = twin, loaded.input.fixed_batch
        elif not half:
            return loaded
    if loaded.opset < QDQ_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, QDQ_OPSET)
            model.ir_version = max(model.ir_version, 7)  # (IR 3 wants every initializer listed as an input)
            drop_initializer_inputs(model.graph)
            onnx.checker.check_model(model)
            if batch is not None:
                # the converter writes shape-reading ops (Softmax's axis at 13: Shape, Flatten, Reshape)
                # that pre-processing would fold with the fixed batch, and reconstruction and QAT run
                # other batches through the torch twin: the twin takes any batch, the file's comes back
                any_batch(model)
        except Exception as exc:  # the converter raises many kinds
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(f"{loaded.source.name}: opset {loaded.opset} could not be converted to opset "
                                        f"{QDQ_OPSET}, which quantization needs: {first}") from None
    model = _infer_shapes(model, loaded.source)
    path = Path(loaded._scratch.name) / f"{loaded.source.stem}.quantizable.onnx"
    _save(model, path)
    shape = (None, *loaded.input.shape[1:]) if batch is not None else loaded.input.shape
    return replace(loaded, path=path, model=model, input=replace(loaded.input, dtype=np.dtype(np.float32), shape=shape),
                   opset=opset_of(model), output_names=[o.name for o in model.graph.output],
                   file_dtype=loaded.input.dtype if half else loaded.file_dtype,
                   float16_outputs=tuple(o.name for o in loaded.model.graph.output
                                         if o.type.tensor_type.elem_type == TensorProto.FLOAT16) or loaded.float16_outputs,
                   file_batch=batch if batch is not None else loaded.file_batch)


def _any_batch_twin(model: onnx.ModelProto, name: str, folder: Path) -> Optional[onnx.ModelProto]:
    """``model`` (its batch fixed) with its batch made symbolic, where that twin runs one sample
    more than the batch and gives each of the others what the fixed model gives it: nothing
    inside depends on the batch (a Reshape to [1, -1] would). None otherwise."""
    from ..runtime import ort_session

    dims = [d.dim_value for d in next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim]
    images = np.random.default_rng(0).standard_normal((dims[0] + 1, *dims[1:])).astype(np.float32)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    any_batch(twin)
    outputs = []
    for kind, graph, batch in (("fixed", model, images[:-1]), ("any", twin, images)):
        path = folder / f"batch-{kind}.onnx"
        _save(graph, path)
        try:
            outputs.append(ort_session(path).run(None, {name: batch}))
        except Exception:  # (ORT refuses the other batch: something inside fixes it)
            return None
        finally:
            path.unlink(missing_ok=True)
    alike = all(np.shape(any_) == (dims[0] + 1, *np.shape(fixed)[1:]) and _computes_alike(fixed, any_[:-1])
                for fixed, any_ in zip(*outputs))
    return twin if alike else None


def _computes_alike(reference: np.ndarray, twin: np.ndarray) -> bool:
    """Whether a twin's output is the file's, up to float rounding (the twins' checks)."""
    return np.shape(reference) == np.shape(twin) and np.allclose(
        np.asarray(twin, np.float64), np.asarray(reference, np.float64),
        rtol=1e-4, atol=1e-5 * (float(np.abs(reference).max()) + 1))


def _set_batch(model: onnx.ModelProto, batch: int | str) -> None:
    """The first axis of the graph's inputs and outputs becomes ``batch``: a size, or a symbol."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            if isinstance(batch, str):
                dims[0].dim_param = batch
            else:
                dims[0].dim_value = batch


def any_batch(model: onnx.ModelProto) -> None:
    """Make the first axis of the graph's inputs and outputs symbolic (``N``), in place, and
    drop the shapes inferred from it."""
    _set_batch(model, "N")
    del model.graph.value_info[:]


def fixed_batch_interface(model: onnx.ModelProto, batch: int) -> None:
    """Fix the first axis of ``model``'s inputs and outputs to ``batch`` again, in place (undoes
    :func:`any_batch` on a quantized twin)."""
    _set_batch(model, batch)


def opset_of(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return 1  # ONNX: an absent default-domain import means opset 1


def _save(model: onnx.ModelProto, target: Path) -> None:
    """Write ``model`` (data inline) to ``target``; beyond protobuf's 2 GB, with its data beside it."""
    if model.ByteSize() < 2**31 - 1:
        onnx.save(model, str(target))
    else:
        onnx.save(model, str(target), save_as_external_data=True, location=f"{target.name}.data")


def _read_proto(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """The model and the very bytes it was parsed from (one read of the file)."""
    try:
        data = path.read_bytes()
        model = onnx.load_from_string(data)
    except (DecodeError, RuntimeWarning, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model (protobuf parse failed: {exc})") from None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    # A text or truncated file can parse as an almost empty message: demand a real graph.
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise ModelLoadError(f"{path} is not a valid ONNX model (no IR version, nodes or outputs; truncated?)")
    return model, data


def _external_tensors(model: onnx.ModelProto):
    return [t for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]


def _load_external_data(model: onnx.ModelProto, path: Path) -> bool:
    tensors = _external_tensors(model)
    if not tensors:
        return False
    base = path.parent.resolve()
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(base):
            raise ModelLoadError(
                f"tensor '{tensor.name}' points its external data outside the model's folder ({location!r}); refused"
            )
        if not target.is_file():
            raise ModelLoadError(f"external data file for tensor '{tensor.name}' not found: {target}")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelLoadError(f"cannot load external data of {path}: {exc}") from None
    return True


def _check(model: onnx.ModelProto, path: Path) -> None:
    try:
        if model.ByteSize() < 2**31 - 1:
            onnx.checker.check_model(model)
        else:  # protobuf cannot serialise >2 GB: check from the file instead
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path} fails the ONNX checker: {first}") from None


def _check_values(model: onnx.ModelProto, path: Path) -> None:
    """What the checker lets through but no model computes with: BatchNorm epsilons that are
    negative or not finite, float weights holding NaN or Inf (the parity run would compare
    NaN with NaN and call it a match)."""
    for number, node in enumerate(model.graph.node):
        try:  # protobuf hands back bytes (or raises) for a string field that is not UTF-8
            names = (node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute))
            valid = all(isinstance(name, str) for name in names)
        except UnicodeDecodeError:
            valid = False
        if not valid:
            raise ModelLoadError(f"{path}: node #{number} has a name, type or tensor name that is not valid UTF-8")
        if node.op_type == "BatchNormalization":
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            if not (np.isfinite(eps) and eps >= 0):
                raise ModelLoadError(f"{path}: BatchNormalization {node.name or node.output[0]!r} has epsilon {eps}; "
                                     "it must be a finite number >= 0")
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOAT_TYPES and tensor.data_location != TensorProto.EXTERNAL:
            try:
                values = numpy_helper.to_array(tensor)
            except Exception as exc:  # data that does not fit its shape or type
                raise ModelLoadError(f"{path}: initializer {tensor.name!r} cannot be read: {exc}") from None
            if values.size and not np.isfinite(values).all():
                raise ModelLoadError(f"{path}: initializer {tensor.name!r} holds NaN or Inf values; "
                                     "the model cannot compute meaningful outputs")


# ops that hold integer tensors: a model with them was quantized already (ai.onnx's, and the
# com.microsoft QLinear* ops ORT's QOperator format writes)
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger")


def quantized_ops(model: onnx.ModelProto) -> str:
    """What makes ``model`` a quantized model, e.g. "16 DequantizeLinear, 10 QuantizeLinear";
    "" for a float model."""
    found = collections.Counter(node.op_type for node in model.graph.node
                                if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"))
    return ", ".join(f"{count} {op}" for op, count in sorted(found.items()))


def _check_float(model: onnx.ModelProto, path: Path) -> None:
    """A quantized model (QDQ or QOperator) is refused by name: dsgonnx quantizes float models,
    and half of its stages would otherwise fail deep inside (an unsupported DequantizeLinear in
    the torch conversion, a KeyError in ORT's calibration)."""
    ops = quantized_ops(model)
    if ops:
        raise UnsupportedModelError(f"{path} is quantized already ({ops}): dsgonnx works on float models; give it the "
                                    "float original (validate scores a quantized model against it)")


# an image classifier's input: up to 2048×2048 pixels (dsgonnx keeps calibration sets and a
# model's activations in memory; 4096² inputs took 5 GB before a kill)
MAX_PIXELS = 2048 * 2048


def _check_size(spec: InputSpec) -> None:
    _, channels, height, width = spec.shape
    if height * width > MAX_PIXELS:
        gib = channels * height * width * 4 / 2**30
        raise InputSpecError(f"input '{spec.name}' is {height}×{width} pixels ({gib:.1f} GiB per float32 image); "
                             f"dsgonnx takes image inputs up to {MAX_PIXELS:,} pixels (2048×2048)")


def _dims(value_info: onnx.ValueInfoProto) -> list[Optional[int]]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _image_input(model: onnx.ModelProto, given: Optional[tuple[int, int, int, int]]) -> tuple[InputSpec, str]:
    """The image input, channels-first, and the layout the file has ("NCHW" or "NHWC")."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise InputSpecError("model has no graph input (every input is an initializer)")
    if len(inputs) > 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise InputSpecError(f"model has {len(inputs)} inputs ({names}); dsgonnx needs a single image input")
    value = inputs[0]
    name = value.name
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor_type.elem_type not in _FLOAT_TYPES | _INTEGER_TYPES:
        type_name = TensorProto.DataType.Name(tensor_type.elem_type) if value.type.HasField("tensor_type") else "non-tensor"
        raise InputSpecError(f"input '{name}' is {type_name}, not a float or uint8 image tensor")
    if not tensor_type.HasField("shape"):
        if given is None:
            raise InputSpecError(f"input '{name}' has no shape; give `input_shape` NxCxHxW (e.g. 1x3x224x224)")
        dims: list[Optional[int]] = [None] * 4
    else:
        dims = _dims(value)
    if len(dims) != 4:
        raise InputSpecError(f"input '{name}' has rank {len(dims)}; dsgonnx needs a 4-D NCHW or NHWC image input")
    layout = "NHWC" if _looks_nhwc(dims, given) else "NCHW"
    if layout == "NHWC":  # work channels-first; `input_shape` may come in either layout
        dims = [dims[0], dims[3], dims[1], dims[2]]
        if given is not None and layout_of(given) == "NHWC":
            given = (given[0], given[3], given[1], given[2])
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if given is not None:
        for axis, (have, want) in enumerate(zip(dims, given)):
            if have is not None and have != want:
                raise InputSpecError(
                    f"`input_shape` {'x'.join(map(str, given))} conflicts with input '{name}' "
                    f"(axis {axis} is fixed to {have}{' in NCHW order' if layout == 'NHWC' else ''})"
                )
        batch = None if dims[0] is None else dims[0]
        return InputSpec(name, (batch, given[1], given[2], given[3]), dtype), layout
    if dims[2] is None and dims[3] is None and dims[1] is not None:
        size = metadata_image_size(model)
        if size is not None:
            key, (height, width) = size
            say(f"input '{name}': dynamic H/W taken as {height}×{width} from the model's metadata ({key!r})")
            dims = [dims[0], dims[1], height, width]
    unresolved = [label for label, d in zip("NCHW", dims) if d is None and label != "N"]
    if unresolved:
        order = "NCHW" if layout == "NCHW" else "NHWC"
        shown = "x".join(label if dims["NCHW".index(label)] is None else str(dims["NCHW".index(label)]) for label in order)
        example = "1x3x224x224" if layout == "NCHW" else "1x224x224x3 (or NCHW 1x3x224x224)"
        raise InputSpecError(f"input '{name}' has dynamic {'/'.join(unresolved)} ({shown}); give `input_shape`, e.g. {example}")
    if dims[1] not in IMAGE_CHANNELS:
        raise InputSpecError(f"input '{name}' has {dims[1]} channels; an image input has 1, 3 or 4 (NCHW)")
    return InputSpec(name, (dims[0], dims[1], dims[2], dims[3]), dtype), layout


# metadata_props keys vendors write the input size under (Ultralytics: imgsz "[224, 224]")
IMAGE_SIZE_KEYS = ("imgsz", "image_size", "img_size", "input_size", "resolution")


def metadata_image_size(model: onnx.ModelProto) -> Optional[tuple[str, tuple[int, int]]]:
    """(key, (height, width)) from the model's metadata: one size, or the last two of a list
    ("224", "[224, 224]", "3x224x224"); None when no key holds a plausible size."""
    props = {p.key.lower(): p.value for p in model.metadata_props}
    for key in IMAGE_SIZE_KEYS:
        if key not in props:
            continue
        numbers = [int(n) for n in re.findall(r"\d+", props[key])]
        sizes = [n for n in numbers if n > max(IMAGE_CHANNELS)]  # channels and batch are not sizes
        if len(sizes) == 1:
            sizes = sizes * 2
        if len(sizes) >= 2 and all(8 <= n <= 4096 for n in sizes[-2:]):
            return key, (sizes[-2], sizes[-1])
    return None


def _looks_nhwc(dims: list[Optional[int]], given: Optional[tuple[int, int, int, int]]) -> bool:
    """The file's layout where its channels say it; ``given`` decides only where they do not."""
    if dims[1] in IMAGE_CHANNELS:  # channels first: a channels-last `input_shape` is the user's slip
        return False
    return layout_of(dims) == "NHWC" or (given is not None and layout_of(given) == "NHWC")


def _with_input_shape(model: onnx.ModelProto, spec: InputSpec) -> onnx.ModelProto:
    """Write resolved C/H/W into the graph input so shape inference can propagate them."""
    for value in model.graph.input:
        if value.name == spec.name:
            dims = value.type.tensor_type.shape.dim
            if len(dims) != 4:
                value.type.tensor_type.shape.Clear()
                for _ in range(4):
                    value.type.tensor_type.shape.dim.add()
                dims = value.type.tensor_type.shape.dim
                dims[0].dim_param = "N"
            for axis in (1, 2, 3):
                dims[axis].Clear()
                dims[axis].dim_value = spec.shape[axis]
    return model


def _infer_shapes(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    if model.ByteSize() >= 2**31 - 1:
        return model  # in-memory inference cannot serialise >2 GB; shapes come from the run instead
    try:
        inferred = shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelLoadError(f"{path}: shape inference failed: {first}") from None
    _check_sizes(inferred, path)
    return inferred


_WINDOWED = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv")


def _check_sizes(model: onnx.ModelProto, path: Path) -> None:
    """A tensor inferred with a size below 1 cannot exist: some kernel, dilation, stride or
    padding does not fit its input. ONNX Runtime aborts the process on some of these (a C++
    assertion), so they are refused before it sees the model."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for value in (*model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        node = producers.get(value.name)
        windowed = node is not None and node.op_type in _WINDOWED
        # empty tensors (size 0) are legal elsewhere, negative sizes never
        if any(d.HasField("dim_value") and (d.dim_value < 0 or (d.dim_value == 0 and windowed)) for d in dims[1:]):
            shown = "×".join(str(d.dim_value) if d.HasField("dim_value") else "?" for d in dims)
            where = f" ({node.op_type} {node.name!r})" if node is not None else ""
            raise ModelLoadError(f"{path}: tensor {value.name!r}{where} would be {shown}: a kernel, dilation, stride "
                                 "or padding does not fit its input")


_SCORE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _check_scores(model: onnx.ModelProto) -> None:
    """The first output must be the class scores: floats, one per class (N×C, or with sizes of
    1 around C: N×C×1×1), not class indices nor a map per class (segmentation, detection)."""
    if not model.graph.output:
        raise UnsupportedModelError("the model has no output")
    output = model.graph.output[0]
    kind = output.type.tensor_type.elem_type
    if kind and kind not in _SCORE_TYPES:
        raise UnsupportedModelError(
            f"output '{output.name}' is {onnx.TensorProto.DataType.Name(kind).lower()}: dsgonnx quantizes classifiers "
            "whose first output is the class scores (floats), not class indices or labels")
    dims = _dims(output)
    if sum(d is not None and d > 1 for d in dims[1:]) > 1:
        shape = "×".join("?" if d is None else str(d) for d in dims)
        raise UnsupportedModelError(
            f"output '{output.name}' is {shape}: dsgonnx quantizes classifiers, whose first output holds one score "
            "per class (N×C, or N×C×1×1), not a map of them (segmentation, detection)")


def _num_classes(model: onnx.ModelProto) -> Optional[int]:
    """Classes = product of the first output's non-batch dims (N×1000 and N×1000×1×1 alike)."""
    dims = _dims(model.graph.output[0]) if model.graph.output else []
    if not dims or any(d is None for d in dims[1:]):
        return None
    count = int(np.prod(dims[1:])) if len(dims) > 1 else dims[0]
    return count
