"""``models import``: package an operator's own model (ONNX, Keras, SavedModel, int8 TFLite).

The result is the package ``models build`` writes (docs/model-package.md), calibrated and
quantized on the operator's data, with an input spec and a lineage that make it
reproducible: the same inputs give byte-identical files (``created`` comes from
``SOURCE_DATE_EPOCH`` when set). Every refusal is an :class:`ImportRejected` with a stable
``reason`` and a counter (``import_rejected_<reason>``): a model is checked before it is
converted, and data before it is used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import ModelError, PackageError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.runtime.archive import ArchiveLimits
from edgefleet.device.runtime.backends import _litert_interpreter, open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import (
    GOLDEN_RULE_KEY,
    HeadCut,
    InputSpec,
    Manifest,
    Normalization,
    Preprocessing,
    QuantParams,
    Variant,
    VariantName,
    file_sha256,
)
from edgefleet.device.runtime.mlp import softmax
from edgefleet.device.runtime.onnx_check import check_no_external_data
from edgefleet.models.build.onnx_export import (
    CALIB_METHODS,
    CALIB_OPTIONS,
    IMPORT_INT8,
    CalibMethod,
    Renamed,
    quantize_onnx_int8,
    shorten_names,
)
from edgefleet.models.build.pipeline import (
    BuildResult,
    Progress,
    _check_out,
    created_now,
    measure_variants,
    package_files,
    publish,
    staged,
)
from edgefleet.models.core.calibration import expected_calibration_error, fit_temperature
from edgefleet.models.core.reference_stats import reference_stats

__all__ = ["ImportOptions", "ImportRejected", "import_model"]

F32 = npt.NDArray[np.float32]
Layout = Literal["flat", "NHWC", "NCHW", "NWC"]
SourceKind = Literal["onnx", "keras", "savedmodel", "tflite"]
#: Versions recorded in the lineage (distribution names).
_VERSIONED = ("edgefleet", "onnx", "onnxruntime", "tf2onnx", "tensorflow", "ai-edge-litert")
#: Operators that may follow the head's Gemm/MatMul up to the output (bias, activation).
#: Drift features of an imported model's input at most: wider inputs (images) are pooled
#: into this many run means, so the manifest and the device's drift window stay small.
MAX_DRIFT_FEATURES = 256
_HEAD_TAIL = frozenset({"Add", "Relu", "Identity", "Flatten", "Reshape", "Squeeze"})


class ImportRejected(ModelError):
    """A model or data set ``models import`` refuses; ``reason`` is a stable token."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reject(reason: str, message: str) -> ImportRejected:
    default_metrics().inc(f"import_rejected_{reason}")
    return ImportRejected(message, reason=reason)


@dataclass(frozen=True)
class ImportOptions:
    """Everything ``models import`` can be told."""

    model: Path
    calibration: Path
    eval: Path
    out: Path
    labels: Path | None = None
    head_from: str | None = None
    name: str | None = None
    version: str = "1.0.0"
    task: str = "custom"
    layout: Layout | None = None
    scale: float = 1.0
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    #: Calibration methods tried for int8 ONNX; the best on held-out calibration rows wins.
    methods: Sequence[CalibMethod] = CALIB_METHODS
    #: Share of the calibration rows held out to choose the method.
    holdout: float = 0.25
    #: The package (all files) may not be larger than what a device unpacks.
    max_bytes: int = field(default_factory=lambda: ArchiveLimits().max_total_bytes)
    #: For an ONNX model: a SavedModel of the same model (logits out) whose full-integer
    #: conversion becomes the ``tflite-int8`` variant (a fine-tuned head, server/fl/head.py).
    tflite_source: Path | None = None


# -- reading the inputs -----------------------------------------------------------------


def _tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative name, file sha256) list."""
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_sha256(p)}\n".encode())
    return h.hexdigest()


def _source_kind(path: Path) -> SourceKind:
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "savedmodel"
        raise _reject("format", f"{path.name}: a folder but not a SavedModel (no "
                      "saved_model.pb); expected .onnx, .keras, .tflite or a SavedModel")
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".keras", ".tflite"):
        return {".onnx": "onnx", ".keras": "keras", ".tflite": "tflite"}[suffix]  # type: ignore[return-value]
    raise _reject("format", f"{path.name}: unknown model format; expected .onnx, .keras, "
                  ".tflite or a SavedModel folder")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class _Data:
    x: F32
    y: npt.NDArray[np.int64]
    sha256: str


def _load_npz(path: Path, what: str) -> _Data:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise _reject("data", f"{what} {path.name}: needs arrays 'x' (inputs) and 'y' "
                              f"(integer labels), has {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise _reject("data", f"{what} {path.name}: not a readable .npz ({exc})") from None
    if x.ndim == 0:
        raise _reject("data_shape", f"{what} x is a scalar; expected one row per sample")
    if x.dtype.kind not in "fiu":
        raise _reject("data_dtype", f"{what} x has dtype {x.dtype}; expected float32 (or "
                      "integer pixel values)")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise _reject("labels_mismatch", f"{what} y must be {len(x)} integer labels, one per "
                      f"row of x; got shape {y.shape} dtype {y.dtype}")
    xf = x.astype(np.float32)
    if not np.isfinite(xf).all():
        raise _reject("data_nonfinite", f"{what} x has NaN/inf values")
    return _Data(xf, y.astype(np.int64), file_sha256(path))


def _check_data(d: _Data, shape: tuple[int, ...], n_classes: int, what: str) -> None:
    if d.x.shape[1:] != shape:
        want = ", ".join(map(str, shape))
        raise _reject("data_shape", f"{what} x has shape {d.x.shape}; the model takes "
                      f"(n, {want}) float32")
    if len(d.y) == 0:
        raise _reject("data", f"{what} is empty")
    if int(d.y.min()) < 0 or int(d.y.max()) >= n_classes:
        raise _reject("labels_mismatch", f"{what} y has labels {int(d.y.min())}.."
                      f"{int(d.y.max())}; the model has {n_classes} outputs (0.."
                      f"{n_classes - 1})")


# -- the ONNX graph -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Graph:
    input_name: str
    output_name: str
    shape: tuple[int, ...]
    n_classes: int
    ops: tuple[str, ...]
    removed_softmax: bool


def _dims(value_info: Any) -> list[int | str] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in t.shape.dim]


def _check_onnx(path: Path) -> _Graph:
    """Refuse what a device could not run; strip a final Softmax (packages output logits)."""
    import onnx
    from onnx import numpy_helper

    try:
        check_no_external_data(path)
    except PackageError as exc:
        raise _reject("external_data", f"{exc}: save it with all tensors inside the file "
                      "(onnx.save_model(m, path, save_as_external_data=False))") from None
    proto = onnx.load(str(path))
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _reject("signature", f"the model has {len(inputs)} inputs and "
                      f"{len(graph.output)} outputs; expected one input and one output "
                      "(logits or probabilities)")
    inp, out = inputs[0], graph.output[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise _reject("input_dtype", f"input {inp.name!r} is not float32")
    dims = _dims(inp)
    if dims is None or len(dims) < 2:
        raise _reject("dynamic_shape", f"input {inp.name!r} has no shape; expected "
                      "(batch, *fixed sample dims), e.g. torch.onnx.export with "
                      "dynamic_axes only on dim 0")
    if not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        raise _reject("dynamic_shape", f"input {inp.name!r} has shape {dims}: every dim "
                      "but the batch must be fixed")
    for t in graph.initializer:
        w = numpy_helper.to_array(t)
        if w.dtype.kind == "f" and not np.isfinite(w).all():
            raise _reject("nonfinite_weights", f"weight {t.name!r} has "
                          f"{int((~np.isfinite(w)).sum())} NaN/inf values")
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                w = numpy_helper.to_array(a.t)
                if w.dtype.kind == "f" and not np.isfinite(w).all():
                    raise _reject("nonfinite_weights", f"constant {node.name!r} has "
                                  "NaN/inf values")
    unknown = sorted({f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in graph.node
                      if not onnx.defs.has(n.op_type, n.domain)})
    if unknown:
        raise _reject("unsupported_op", f"operators not in the ONNX standard: "
                      f"{', '.join(unknown)} (onnxruntime's CPU provider cannot run them)")
    _ort_session(path)
    producer = next((n for n in graph.node if out.name in n.output), None)
    removed = producer is not None and producer.op_type == "Softmax"
    if removed and producer is not None:
        # The logits tensor takes the output's name, so the graph still ends in ``out``.
        logits = producer.input[0]
        graph.node.remove(producer)
        for node in graph.node:
            node.input[:] = [out.name if i == logits else i for i in node.input]
            node.output[:] = [out.name if o == logits else o for o in node.output]
        onnx.save_model(proto, str(path))
    out_dims = _dims(out)
    n_classes = out_dims[-1] if out_dims and isinstance(out_dims[-1], int) else 0
    return _Graph(inp.name, out.name, tuple(int(d) for d in dims[1:]), int(n_classes),
                  tuple(n.op_type for n in graph.node), removed)


def _ort_session(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors are untyped
        msg = str(exc)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
            raise _reject("unsupported_op", f"onnxruntime's CPU provider has no kernel: "
                          f"{msg.strip().splitlines()[-1][:300]}") from None
        raise _reject("invalid_model", f"onnxruntime cannot load the model: "
                      f"{msg.strip()[:300]}") from None


def _head_cut(path: Path, head_from: str | None) -> HeadCut | None:
    """The last Gemm/MatMul before the output (or ``head_from``): where the head starts."""
    import onnx

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)
    if head_from is not None:
        node = next((n for n in nodes if n.name == head_from), None)
        if node is None:
            names = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
            raise _reject("head_node", f"--head-from {head_from!r}: no such node; the "
                          f"Gemm/MatMul nodes are {names}")
        auto = False
    else:
        node = next((n for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
        if node is None:
            return None
        auto = True
    dim = None
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is not None and len(w.dims) == 2:
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        dim = int(w.dims[1] if trans_b else w.dims[0])
    return HeadCut(node=node.name, op=node.op_type, embedding=node.input[0], dim=dim,
                   auto=auto)


# -- preprocessing ------------------------------------------------------------------------


def _layout(shape: tuple[int, ...], given: Layout | None) -> Layout:
    if given is not None:
        return given
    if len(shape) == 1:
        return "flat"
    if len(shape) == 2:
        return "NWC"
    if len(shape) == 3 and shape[0] <= 4 < shape[-1]:
        return "NCHW"
    return "NHWC"


def _normalization(pre: Preprocessing, shape: tuple[int, ...], layout: Layout) -> Normalization:
    """The per-feature ``(x - mean) / std`` equal to ``(x * scale - m) / s``."""
    mean = np.asarray(pre.mean, np.float64) / pre.scale
    std = np.asarray(pre.std, np.float64) / pre.scale
    if mean.size == 1 and std.size == 1:
        return Normalization(mean=[float(mean[0])], std=[float(std[0])])
    channels = shape[0] if layout == "NCHW" else shape[-1]
    for v, what in ((mean, "--mean"), (std, "--std")):
        if v.size not in (1, channels):
            raise _reject("preprocessing", f"{what} has {v.size} values; the input "
                          f"{list(shape)} ({layout}) has {channels} channels")
    full = np.empty(shape, np.float64)
    out = []
    for v in (mean, std):
        v = np.broadcast_to(v, (channels,))
        full[...] = v.reshape((-1, *([1] * (len(shape) - 1)))) if layout == "NCHW" else v
        out.append([float(a) for a in full.ravel()])
    return Normalization(mean=out[0], std=out[1])


# -- the import -----------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _labels(path: Path | None, n_classes: int) -> list[str]:
    if path is None:
        return [str(i) for i in range(n_classes)]
    names = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if len(names) != n_classes:
        raise _reject("labels_mismatch", f"labels file {path.name} has {len(names)} names; "
                      f"the model has {n_classes} outputs")
    return names


def _accuracy(logits: F32, y: npt.NDArray[np.int64]) -> float:
    return float(np.mean(logits.argmax(1) == y))


def _choose_quantization(fp32: Path, tmp: Path, inp: str, shape: tuple[int, ...],
                         xc: F32, yc: npt.NDArray[np.int64], opts: ImportOptions,
                         say: Progress) -> tuple[CalibMethod, dict[str, Any]]:
    """Quantize with each method on the first rows, score on held-out rows, keep the best."""
    n_hold = max(1, round(len(xc) * opts.holdout)) if len(xc) > 1 else 0
    fit, held = xc[: len(xc) - n_hold], xc[len(xc) - n_hold:]
    y_held = yc[len(xc) - n_hold:]
    scores: dict[str, float] = {}
    best: CalibMethod | None = None
    for method in opts.methods:
        say(f"quantizing ONNX int8 ({method} calibration)")
        cand = tmp / f".int8-{method}.onnx"
        quantize_onnx_int8(fp32, cand, fit.reshape(-1, *shape), input_name=inp, method=method,
                           **IMPORT_INT8)
        if n_hold:
            backend = open_backend(tmp, Variant(file=cand.name, format="onnx",
                                                precision="int8", input_name=inp,
                                                output_name=_out_name(cand),
                                                input_shape=list(shape)), threads=1)
            scores[method] = _accuracy(backend.run(held), y_held)
        else:
            scores[method] = 0.0
        if best is None or scores[method] > scores[best]:
            best = method
    if best is None:
        raise _reject("quantization", "no calibration method given")
    (tmp / f".int8-{best}.onnx").rename(tmp / "model_int8.onnx")
    shorten_names(tmp / "model_int8.onnx")  # onnxruntime's suffixed names: ~2 % of the file
    for method in opts.methods:
        (tmp / f".int8-{method}.onnx").unlink(missing_ok=True)
    return best, {"method_scores_heldout": scores, "fit_rows": len(fit),
                  "heldout_rows": n_hold}


def _out_name(path: Path) -> str:
    import onnx

    return str(onnx.load(str(path), load_external_data=False).graph.output[0].name)


def _tflite_source(path: Path) -> tuple[tuple[int, ...], int, Variant]:
    try:
        interp = _litert_interpreter()(model_path=str(path))
        interp.allocate_tensors()
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError on bad files
        raise _reject("invalid_model", f"{path.name}: LiteRT cannot load it: {exc}") from None
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise _reject("signature", f"the model has {len(ins)} inputs and {len(outs)} "
                      "outputs; expected one of each")
    i, o = ins[0], outs[0]
    if i["dtype"] != np.int8 or o["dtype"] != np.int8:
        raise _reject("tflite_not_int8", f"{path.name} takes {np.dtype(i['dtype']).name} and "
                      f"gives {np.dtype(o['dtype']).name}; only full-integer (int8 in and "
                      "out) TFLite is packaged as is: import the Keras/SavedModel/ONNX model "
                      "instead")
    sig = [int(d) for d in i.get("shape_signature", i["shape"])[1:]]
    if any(d <= 0 for d in sig):
        raise _reject("dynamic_shape", f"input has shape {sig} after the batch: every dim "
                      "must be fixed")
    in_s, in_z = i["quantization"]
    out_s, out_z = o["quantization"]
    var = Variant(file="model_int8.tflite", format="tflite", precision="int8",
                  input_quant=QuantParams(scale=float(in_s), zero_point=int(in_z)),
                  output_quant=QuantParams(scale=float(out_s), zero_point=int(out_z)),
                  input_shape=sig)
    return tuple(sig), int(o["shape"][-1]), var


def import_model(opts: ImportOptions, progress: Progress | None = None) -> BuildResult:
    """Check, convert, quantize, calibrate and package ``opts.model`` into ``opts.out``."""
    say = progress or (lambda _m: None)
    src = opts.model
    if not src.exists():
        raise _reject("format", f"{src}: no such file or folder")
    kind = _source_kind(src)
    if (size := _size(src)) > opts.max_bytes:
        raise _reject("too_large", f"{src.name} is {size} bytes; a package may hold at most "
                      f"{opts.max_bytes} bytes")
    if not 0 < opts.holdout < 1:
        raise _reject("quantization", "holdout must be in (0, 1)")
    calib = _load_npz(opts.calibration, "calibration data")
    evald = _load_npz(opts.eval, "evaluation data")
    _check_out(opts.out)
    with staged(opts.out) as tmp:
        return _import(opts, kind, calib, evald, tmp, say)


def _import(opts: ImportOptions, kind: SourceKind, calib: _Data, evald: _Data, tmp: Path,
            say: Progress) -> BuildResult:
    with ExitStack() as stack:
        variants: dict[VariantName, Variant] = {}
        quant: dict[str, Any] = {}
        head: HeadCut | None = None
        removed_softmax = False
        sm_dir: Path | None = None
        #: tf2onnx's names -> the short ones the package's graphs use (None: as given)
        renamed: Renamed | None = None
        source_names: dict[str, str] | None = None
        if kind == "tflite":
            shape, n_classes, var = _tflite_source(opts.model)
            shutil.copyfile(opts.model, tmp / "model_int8.tflite")
            variants["tflite-int8"] = var
            quant["tflite"] = {"source": "packaged as is"}
        else:
            fp32 = tmp / "model_fp32.onnx"
            if kind == "onnx":
                shutil.copyfile(opts.model, fp32)
                sm_dir = opts.tflite_source
            else:
                sm_dir, removed_softmax, renamed = stack.enter_context(
                    _tf_to_onnx(opts.model, fp32, say))
            g = _check_onnx(fp32)
            shape = g.shape
            if g.removed_softmax and sm_dir is not None:
                # A SavedModel that ends in softmax: its TFLite form would output
                # probabilities, not logits, so it gets no TFLite variant.
                sm_dir = None
                quant["tflite"] = {"skipped": "the SavedModel ends in softmax; export one "
                                   "that outputs logits for a TFLite variant"}
            removed_softmax = removed_softmax or g.removed_softmax
            variants["onnx-fp32"] = Variant(file="model_fp32.onnx", format="onnx",
                                            precision="fp32", input_name=g.input_name,
                                            output_name=g.output_name,
                                            input_shape=list(shape))
            probe = open_backend(tmp, variants["onnx-fp32"], threads=1)
            n_classes = g.n_classes or int(
                probe.run(np.zeros((1, int(np.prod(shape))), np.float32)).shape[-1])
            head_from = opts.head_from
            if renamed is not None and head_from is not None:
                head_from = renamed.nodes.get(head_from, head_from)
            head = _head_cut(fp32, head_from)
            if renamed is not None:
                source_names = {} if head is None else _source_names(renamed, head)
        labels = _labels(opts.labels, n_classes)
        for d, what in ((calib, "calibration data"), (evald, "evaluation data")):
            _check_data(d, shape, n_classes, what)
        layout = _layout(shape, opts.layout)
        try:
            pre = Preprocessing(scale=opts.scale, mean=list(opts.mean), std=list(opts.std))
        except ValueError as exc:
            raise _reject("preprocessing", f"preprocessing: {exc}") from None
        norm = _normalization(pre, shape, layout)
        n_in = int(np.prod(shape))
        xc = normalize(calib.x.reshape(len(calib.x), n_in), norm)
        xe = normalize(evald.x.reshape(len(evald.x), n_in), norm)
        if "onnx-fp32" in variants:
            best, qinfo = _choose_quantization(
                tmp / "model_fp32.onnx", tmp, variants["onnx-fp32"].input_name, shape,
                xc, calib.y, opts, say)
            variants["onnx-int8"] = Variant(
                file="model_int8.onnx", format="onnx", precision="int8",
                input_name=variants["onnx-fp32"].input_name,
                output_name=_out_name(tmp / "model_int8.onnx"), input_shape=list(shape))
            quant["onnx"] = {"tool": "onnxruntime.quantization.quantize_static",
                             "preprocess": {"tool": "onnxruntime.quantization.shape_inference"
                                                    ".quant_pre_process",
                                            "symbolic_shape_inference": False,
                                            "onnx_shape_inference": True,
                                            "ort_graph_optimization": True}
                             if IMPORT_INT8["preprocess"] else None,
                             "format": {"qdq": "QDQ", "qoperator": "QOperator"}[
                                 IMPORT_INT8["quant_format"]],
                             "per_channel": IMPORT_INT8["per_channel"], "weights": "int8",
                             "reduce_range": IMPORT_INT8["reduce_range"],
                             "activations": IMPORT_INT8["activations"],
                             "weight_symmetric": True, "activation_symmetric": False,
                             "calibrator_options": {m: dict(CALIB_OPTIONS[m])
                                                    for m in opts.methods},
                             "method": best,
                             "methods_tried": list(opts.methods), "holdout": opts.holdout,
                             **qinfo}
            if head is not None:
                head = _split_head(tmp, head, variants["onnx-fp32"], xc, best, quant, say)
        if sm_dir is not None:
            from edgefleet.models.build.tf_convert import (
                MAX_REPRESENTATIVE,
                saved_model_to_tflite_int8,
            )

            say("converting to full-integer TFLite")
            blob, in_q, out_q = saved_model_to_tflite_int8(sm_dir, xc.reshape(-1, *shape))
            (tmp / "model_int8.tflite").write_bytes(blob)
            variants["tflite-int8"] = Variant(
                file="model_int8.tflite", format="tflite", precision="int8",
                input_quant=in_q, output_quant=out_q, input_shape=list(shape))
            quant["tflite"] = {"converter": "TFLiteConverter.from_saved_model",
                               "full_integer": True, "io": "int8",
                               "optimizations": ["DEFAULT"],
                               "representative_rows": min(len(xc), MAX_REPRESENTATIVE)}
    return _finish(opts, kind, calib, evald, tmp, say, variants, quant, head, labels, shape,
                   layout, pre, norm, xc, xe, removed_softmax, source_names)


def _source_names(renamed: Renamed, head: HeadCut) -> dict[str, str]:
    """The head cut's node and embedding as tf2onnx named them (``models inspect``)."""
    nodes = {new: old for old, new in renamed.nodes.items()}
    tensors = {new: old for old, new in renamed.tensors.items()}
    return {"head_node": nodes.get(head.node, head.node),
            "embedding": tensors.get(head.embedding, head.embedding)}


def _split_head(tmp: Path, head: HeadCut, fp32: Variant, xc: F32, method: CalibMethod,
                quant: dict[str, Any], say: Progress) -> HeadCut:
    """Backbone (int8, on the model's calibration rows and method) and head weights, when
    the head is an MLP a device can train; otherwise the cut stays recorded and the reason
    is in the lineage."""
    from edgefleet.models.build.head import HeadError, split_model

    say("cutting the backbone and the head")
    try:
        cut = split_model(tmp / fp32.file, head, tmp, xc, fp32.input_name,
                          list(fp32.input_shape or []), method)
        if cut.backbone is not None:
            shorten_names(tmp / cut.backbone)  # its output (the embedding) keeps its name
        return cut
    except HeadError as exc:
        quant["head"] = {"skipped": str(exc), "reason": exc.reason}
        return head


def _keep_source_data(opts: ImportOptions, tmp: Path, tflite: bool) -> None:
    """The calibration and evaluation data (and the TensorFlow model, when it made the
    TFLite variant), next to the package files but not in them: the server re-quantizes
    fine-tuned versions with them; devices never receive them."""
    from edgefleet.models.build.head import SOURCE_DIR, keep_tf_source

    (tmp / SOURCE_DIR).mkdir(mode=0o700)
    shutil.copyfile(opts.calibration, tmp / SOURCE_DIR / "calibration.npz")
    shutil.copyfile(opts.eval, tmp / SOURCE_DIR / "eval.npz")
    if tflite:
        keep_tf_source(opts.tflite_source or opts.model, tmp / SOURCE_DIR)


@contextmanager
def _tf_to_onnx(model: Path, fp32: Path, say: Progress
                ) -> Iterator[tuple[Path, bool, Renamed]]:
    """Convert a Keras/SavedModel source to ``fp32``; yields the SavedModel folder (for
    the TFLite conversion), which lives as long as the context, whether a Keras softmax
    was removed before the export, and tf2onnx's names' short replacements
    (:func:`~.onnx_export.shorten_names`; an operator's own ONNX keeps its names)."""
    from edgefleet.models.build.tf_convert import (
        open_saved_model,
        saved_model_for,
        saved_model_to_onnx,
    )

    say("converting with tf2onnx")
    with saved_model_for(model) as (sm_dir, stripped):
        try:
            sm = open_saved_model(sm_dir)
        except ValueError as exc:
            raise _reject("signature", f"{model.name}: {exc}") from None
        dims = sm.sample_shape
        if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
            raise _reject("dynamic_shape", f"input has shape {dims} after the batch: every "
                          "dim must be fixed")
        if sm.dtype != "float32":
            raise _reject("input_dtype", f"input is {sm.dtype}, expected float32")
        saved_model_to_onnx(sm, tuple(int(d or 0) for d in dims), fp32)
        yield sm_dir, stripped, shorten_names(fp32)


def _finish(opts: ImportOptions, kind: SourceKind, calib: _Data, evald: _Data, tmp: Path,
            say: Progress, variants: dict[VariantName, Variant], quant: dict[str, Any],
            head: HeadCut | None, labels: list[str], shape: tuple[int, ...], layout: Layout,
            pre: Preprocessing, norm: Normalization, xc: F32, xe: F32,
            removed_softmax: bool, source_names: dict[str, str] | None) -> BuildResult:
    say("calibrating temperature and measuring every variant")
    ref: VariantName = "onnx-fp32" if "onnx-fp32" in variants else "tflite-int8"
    default: VariantName = "onnx-int8" if "onnx-int8" in variants else "tflite-int8"
    ref_backend = open_backend(tmp, variants[ref], threads=1)
    temperature = fit_temperature(ref_backend.run(xc), calib.y)
    m = measure_variants(tmp, variants, evald.x, xe, evald.y, temperature, default)
    metrics: dict[str, Any] = {"eval_samples": len(evald.y)}
    for key, var in variants.items():
        metrics[key] = {**m.metrics[key], "size_bytes": (tmp / var.file).stat().st_size}
    metrics["ece_uncalibrated"] = expected_calibration_error(softmax(m.logits[ref]), evald.y)
    metrics["ece_calibrated"] = metrics[ref]["ece"]
    files = package_files(tmp)
    total = sum(f.size for f in files.values())
    if total > opts.max_bytes:
        raise _reject("too_large", f"the package would be {total} bytes; a device unpacks at "
                      f"most {opts.max_bytes}")
    lineage: dict[str, Any] = {
        "source": "models import",
        "model": {"kind": kind, "file": opts.model.name, "sha256": _tree_sha256(opts.model),
                  "removed_softmax": removed_softmax,
                  # tf2onnx's scope names replaced by n0.../t0... (input/output kept);
                  # the head cut's names in the converted graph, for the operator
                  "short_names": source_names is not None,
                  **({"source_names": source_names} if source_names else {})},
        "calibration": {"file": opts.calibration.name, "sha256": calib.sha256,
                        "samples": len(calib.y)},
        "eval": {"file": opts.eval.name, "sha256": evald.sha256, "samples": len(evald.y)},
        "labels_sha256": file_sha256(opts.labels) if opts.labels else None,
        "versions": _versions(),
        "quantization": quant,
        "temperature_fit": {"on": "calibration", "variant": ref},
    }
    manifest = Manifest(
        name=opts.name or _safe_name(opts.model),
        version=opts.version,
        task=opts.task,
        created=created_now(),
        labels=labels,
        input=InputSpec(shape=list(shape), layout=layout, preprocessing=pre),
        normalization=norm,
        variants=variants,
        default_variant=default,
        temperature=temperature,
        golden=m.golden,
        golden_atol=m.golden_atol,
        extra={GOLDEN_RULE_KEY: m.golden_rules} if m.golden_rules else {},
        files=files,
        metrics=metrics,
        lineage=lineage,
        head=head,
        reference_stats=reference_stats(evald.x.reshape(len(evald.x), -1), m.held_out_conf,
                                        max_features=MAX_DRIFT_FEATURES),
    )
    if head is not None and head.trainable:
        _keep_source_data(opts, tmp, "tflite-int8" in variants)  # not a manifest file
    return publish(tmp, manifest, opts.out)


def _safe_name(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem) or "model"
    return stem.lstrip("._-")[:64] or "model"
