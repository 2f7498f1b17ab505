"""The backbone/head split of an imported model: cut the graph, read the head, write it back.

A device fine-tunes only the last dense layer or two of an imported model (the head, a
NumPy :class:`~edgefleet.device.runtime.mlp.MLP`) on embeddings that a frozen int8
backbone computes once per sample. This module makes both at import time, from the fp32
ONNX graph and the recorded cut (:class:`~edgefleet.device.runtime.manifest.HeadCut`),
and after a federated run writes the new head back into the fp32 graph, so the usual
import path re-quantizes and packages it. The head must be what the MLP computes:
``Gemm`` or ``MatMul + Add``, a ``Relu`` between two layers, nothing after the last one
but shape no-ops; anything else is a :class:`HeadError` naming the node.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import ModelError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.runtime.manifest import HeadCut, Variant

__all__ = ["BACKBONE_FILE", "HEAD_FILE", "SOURCE_DIR", "TF_SOURCES", "HeadError",
           "head_params", "keep_tf_source", "kept_tf_source", "split_model",
           "tf_source_with_head", "write_head"]

#: The int8 backbone and the head's fp32 weights in a package.
BACKBONE_FILE = "backbone_int8.onnx"
HEAD_FILE = "head.npz"
#: Next to the package files, never listed in the manifest (so never packed or shipped):
#: the operator's calibration and evaluation data, which re-quantizing a fine-tuned
#: version needs on the server.
SOURCE_DIR = "source"
#: The TensorFlow model kept in ``source/`` when the import made a TFLite variant (a Keras
#: file as given, or a SavedModel folder): a fine-tuned version's TFLite variant is
#: converted from it with the new head (:func:`tf_source_with_head`).
TF_SOURCES = ("model.keras", "saved_model")
#: The TensorFlow source with the new head must give the written-back ONNX graph's logits
#: within this (relative to the largest logit), or the TFLite variant is not rebuilt.
TF_PARITY = 1e-3
#: Ops that may sit in the head without changing a 2-D ``(n, features)`` tensor.
_NO_OPS = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})
MAX_LAYERS = 2

F32 = npt.NDArray[np.float32]


class HeadError(ModelError):
    """The head after the cut is not a small MLP a device can train; ``reason`` is stable."""

    def __init__(self, message: str, *, reason: str = "head_unsupported") -> None:
        super().__init__(message)
        self.reason = reason
        default_metrics().inc(f"head_rejected_{reason}")


@dataclass(frozen=True)
class _Dense:
    node: str
    weight: str
    trans_b: bool
    bias: str


def _layers(proto: Any, cut: HeadCut) -> list[_Dense]:
    """The dense layers from the cut node to the graph's output, checked to be an MLP."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = graph.output[0].name
    node = next((n for n in graph.node if n.name == cut.node), None)
    if node is None or node.op_type not in ("Gemm", "MatMul") or node.input[0] != cut.embedding:
        raise HeadError(f"cut node {cut.node!r} is not a Gemm/MatMul on {cut.embedding!r}")
    layers: list[_Dense] = []
    seq: list[str] = []
    while True:
        op = node.op_type
        if op == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if (attrs.get("transA") and attrs["transA"].i) or any(
                    k in attrs and attrs[k].f != 1.0 for k in ("alpha", "beta")):
                raise HeadError(f"Gemm {node.name!r}: transA/alpha/beta are not supported")
            trans_b = bool(attrs["transB"].i) if "transB" in attrs else False
            if len(node.input) < 3 or node.input[2] not in inits:
                raise HeadError(f"Gemm {node.name!r} has no constant bias")
            layers.append(_Dense(node.name, _const(inits, node, 1), trans_b, node.input[2]))
            seq.append("D")
        elif op == "MatMul":
            weight = _const(inits, node, 1)
            nxt = consumers.get(node.output[0], [])
            add = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Add" else None
            bias = None if add is None else next(
                (i for i in add.input if i != node.output[0] and i in inits), None)
            if add is None or bias is None:
                raise HeadError(f"MatMul {node.name!r} is not followed by a constant bias Add")
            layers.append(_Dense(node.name, weight, False, bias))
            seq.append("D")
            node = add
        elif op == "Relu":
            seq.append("R")
        elif op not in _NO_OPS:
            raise HeadError(f"node {node.name!r} ({op}) after the cut: the head may hold "
                            "only Gemm/MatMul+Add, Relu between layers and shape no-ops")
        cur = node.output[0]
        if cur == out:
            break
        nxt = consumers.get(cur, [])
        if len(nxt) != 1:
            raise HeadError(f"tensor {cur!r} after the cut feeds {len(nxt)} nodes; the head "
                            "must be a chain")
        node = nxt[0]
    if "".join(seq) not in ("D", "DRD"):
        raise HeadError(f"the head is {'-'.join(seq)} (D dense, R relu); a device trains "
                        f"one dense layer or two with a Relu between (at most {MAX_LAYERS})")
    for d in layers:
        w, b = _array(inits[d.weight]), _array(inits[d.bias])
        if w.ndim != 2 or b.size != (w.shape[0] if d.trans_b else w.shape[1]):
            raise HeadError(f"layer {d.node!r}: weight {w.shape} and bias {b.shape} do not fit")
    return layers


def _const(inits: dict[str, Any], node: Any, k: int) -> str:
    if len(node.input) <= k or node.input[k] not in inits:
        raise HeadError(f"{node.op_type} {node.name!r}: weight is not a constant")
    return str(node.input[k])


def _array(t: Any) -> npt.NDArray[Any]:
    from onnx import numpy_helper

    return np.asarray(numpy_helper.to_array(t))


def head_params(fp32: Path, cut: HeadCut) -> list[F32]:
    """The head's weights ``[W1, b1, ...]`` (``W`` as ``(in, out)``) read from the graph."""
    import onnx

    proto = onnx.load(str(fp32))
    inits = {t.name: t for t in proto.graph.initializer}
    params: list[F32] = []
    for d in _layers(proto, cut):
        w = _array(inits[d.weight]).astype(np.float32)
        params += [w.T.copy() if d.trans_b else w, _array(inits[d.bias]).astype(np.float32)
                   .reshape(-1)]
    return params


def write_head(fp32: Path, cut: HeadCut, params: list[npt.NDArray[np.floating]],
               dest: Path) -> Path:
    """Copy of the fp32 graph ``fp32`` with the head's initializers replaced by ``params``."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(fp32))
    layers = _layers(proto, cut)
    if len(params) != 2 * len(layers):
        raise HeadError(f"{len(params)} arrays for a head of {len(layers)} layers",
                        reason="head_shape")
    by_name = {t.name: t for t in proto.graph.initializer}
    for d, w, b in zip(layers, params[::2], params[1::2], strict=True):
        for name, new in ((d.weight, np.asarray(w, np.float32).T if d.trans_b else w),
                          (d.bias, b)):
            old = by_name[name]
            arr = np.asarray(new, np.float32)
            if arr.size != int(np.prod(old.dims)) or not np.isfinite(arr).all():
                raise HeadError(f"head array for {name!r} has shape {arr.shape} (or NaN/inf); "
                                f"the graph holds {list(old.dims)}", reason="head_shape")
            old.CopyFrom(numpy_helper.from_array(arr.reshape(tuple(old.dims)), name))
    onnx.save_model(proto, str(dest))
    return dest


def _write_npz(path: Path, arrays: list[F32]) -> None:
    """``np.savez`` layout (``arr_0``, ...; ``load_params`` reads it) with fixed zip
    timestamps, so importing the same inputs twice gives the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i, a in enumerate(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"arr_{i}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        buf.getvalue())


def split_model(fp32: Path, cut: HeadCut, out_dir: Path, calib_x: F32, input_name: str,
                input_shape: list[int], method: Any) -> HeadCut:
    """Write ``backbone_int8.onnx`` (the graph up to ``cut.embedding``, quantized like the
    full model on the same normalized rows) and ``head.npz`` into ``out_dir``.

    Returns the cut with the new files recorded.
    """
    import onnx.utils

    from edgefleet.device.runtime.backends import open_backend
    from edgefleet.models.build.onnx_export import IMPORT_INT8, quantize_onnx_int8

    params = head_params(fp32, cut)
    with tempfile.TemporaryDirectory(prefix=".backbone.", dir=out_dir) as td:
        bb = Path(td) / "backbone_fp32.onnx"
        onnx.utils.extract_model(str(fp32), str(bb), [input_name], [cut.embedding])
        probe = open_backend(Path(td), Variant(
            file=bb.name, format="onnx", precision="fp32", input_name=input_name,
            output_name=cut.embedding, input_shape=input_shape), threads=1).run(calib_x[:1])
        if probe.ndim != 2 or probe.shape[1] != params[0].shape[0]:
            raise HeadError(f"embedding {cut.embedding!r} has shape {probe.shape}; the head "
                            f"takes (n, {params[0].shape[0]})", reason="head_shape")
        quantize_onnx_int8(bb, out_dir / BACKBONE_FILE,
                           calib_x.reshape(-1, *input_shape), input_name=input_name,
                           method=method, **IMPORT_INT8)  # as the model's own int8 variant
    _write_npz(out_dir / HEAD_FILE, params)
    return cut.model_copy(update={"backbone": BACKBONE_FILE, "params": HEAD_FILE,
                                  "dim": int(params[0].shape[0]), "layers": len(params) // 2})


def keep_tf_source(src: Path, source_dir: Path) -> Path:
    """Copy the TensorFlow model ``src`` (a ``.keras`` file or a SavedModel folder) into
    ``source_dir`` under its :data:`TF_SOURCES` name; returns the copy."""
    import shutil

    if src.is_dir():
        return Path(shutil.copytree(src, source_dir / TF_SOURCES[1]))
    return Path(shutil.copyfile(src, source_dir / TF_SOURCES[0]))


def kept_tf_source(root: Path) -> Path | None:
    """The TensorFlow model kept with the package ``root``, if the import kept one."""
    for name in TF_SOURCES:
        p = root / SOURCE_DIR / name
        if p.exists():
            return p
    return None


def tf_source_with_head(src: Path, old: list[F32], new: list[npt.NDArray[np.floating]],
                        dest: Path, x: F32, want: F32) -> dict[str, Any]:
    """Write the SavedModel ``dest``: the kept TensorFlow model ``src`` whose head weights
    (``old``, as :func:`head_params` reads them from the graph it was converted to) are
    replaced by ``new``, and check that it gives ``want`` (the written-back fp32 ONNX
    graph's logits) on the model inputs ``x``. Returns what the lineage records; any
    mismatch is a :class:`HeadError` (``tf_source``), so the caller ships ONNX only."""
    from edgefleet.models.build.tf_convert import (
        VariableMatchError,
        open_saved_model,
        saved_model_with_weights,
    )

    if len(old) != len(new):
        raise HeadError(f"{len(new)} arrays for a head of {len(old)}", reason="head_shape")
    try:
        names = saved_model_with_weights(
            src, dest, [(o, np.asarray(n, np.float32)) for o, n in zip(old, new, strict=True)])
        got = np.asarray(open_saved_model(dest).fn(x.astype(np.float32)), np.float32)
    except VariableMatchError as exc:
        raise HeadError(f"the head is not in the TensorFlow source: {exc}",
                        reason="tf_source") from None
    except Exception as exc:  # TensorFlow's and Keras' load errors are untyped
        raise HeadError(f"the kept TensorFlow model {src.name} cannot be loaded: "
                        f"{str(exc).strip()[:300]}", reason="tf_source") from None
    diff = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    tol = TF_PARITY * max(1.0, float(np.max(np.abs(want))))
    if not diff <= tol:
        raise HeadError(f"the TensorFlow source with the new head differs from the ONNX "
                        f"graph by {diff:.3g} (shape {got.shape}, tolerance {tol:.3g})",
                        reason="tf_source")
    return {"variables": names, "max_abs_diff_vs_onnx_fp32": diff}
