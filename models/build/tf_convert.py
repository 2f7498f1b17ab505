"""TensorFlow models to ONNX (tf2onnx) and to full-integer TFLite, reproducibly.

tf2onnx is the maintained converter; its ``from_keras`` fails on Keras 3, so every
conversion traces a ``tf.function`` of the model (``from_function``), which works for
Keras 2, Keras 3 and SavedModel signatures alike. tf2onnx names new nodes from a
process-wide counter, so two conversions of one model differ only in those numbers:
:func:`canonical_onnx` renumbers them in graph order, making the bytes a function of the
model alone (package hashes must be reproducible). Only ``models.build`` imports this.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import MissingExtraError
from edgefleet.device.runtime.manifest import QuantParams
from edgefleet.models.build.onnx_export import OPSET

__all__ = [
    "SavedModelFn",
    "VariableMatchError",
    "canonical_onnx",
    "keras_to_onnx",
    "open_saved_model",
    "saved_model_for",
    "saved_model_to_onnx",
    "saved_model_to_tflite_int8",
    "saved_model_with_weights",
]

F32 = npt.NDArray[np.float32]
_COUNTER = re.compile(r"^(.*?)__\d+(:\d+)?$")
#: At most this many calibration rows go into the TFLite representative data set.
MAX_REPRESENTATIVE = 300


def _tf() -> Any:
    from edgefleet.models.build.tflite_export import _import_tf

    return _import_tf()[0]


def _tf2onnx() -> Any:
    _tf()  # sets TensorFlow's environment first
    try:
        import tf2onnx
    except ImportError:
        raise MissingExtraError("Keras/SavedModel import", "models", "tf2onnx") from None
    return tf2onnx


def canonical_onnx(proto: Any, rename: dict[str, str] | None = None) -> Any:
    """Renumber tf2onnx's counter suffixes (``X__37``) in order of first use, apply
    ``rename`` (graph input/output names), clear doc strings; returns ``proto``."""
    graph = proto.graph
    rename = dict(rename or {})
    order: list[str] = []
    for node in graph.node:
        order += [node.name, *node.input, *node.output]
    order += [t.name for t in graph.initializer] + [v.name for v in graph.value_info]
    # tf2onnx merges equal constants and keeps one of their names (``const_starts`` or
    # ``const_axes``) in hash order, so a generated constant's new name drops its stem.
    consts = {t.name for t in graph.initializer}
    mapping: dict[str, str] = {}
    n = 0
    for name in order:
        if name in mapping or name in rename:
            continue
        m = _COUNTER.match(name)
        if m:
            stem = "const" if name in consts else m.group(1)
            mapping[name] = f"{stem}__{n}{m.group(2) or ''}"
            n += 1
    mapping.update(rename)

    def sub(name: str) -> str:
        return mapping.get(name, name)

    for node in graph.node:
        node.name = sub(node.name)
        node.doc_string = ""
        node.input[:] = [sub(i) for i in node.input]
        node.output[:] = [sub(o) for o in node.output]
    for coll in (graph.input, graph.output, graph.value_info, graph.initializer):
        for item in coll:
            item.name = sub(item.name)
    # symbolic dims are named from the same counter (``unk__71``)
    dims: dict[str, str] = {}
    for coll in (graph.input, graph.output, graph.value_info):
        for item in coll:
            for i, d in enumerate(item.type.tensor_type.shape.dim):
                if d.HasField("dim_param") and _COUNTER.match(d.dim_param):
                    d.dim_param = dims.setdefault(
                        d.dim_param, "batch" if i == 0 else f"dim__{len(dims)}")
    first = {name: i for i, name in reversed(list(enumerate(
        sub(x) for node in graph.node for x in node.input)))}
    inits = sorted(graph.initializer, key=lambda t: (first.get(t.name, len(first)), t.name))
    copies = [type(t)() for t in inits]
    for dst, src in zip(copies, inits, strict=True):
        dst.CopyFrom(src)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    proto.doc_string = ""
    graph.doc_string = ""
    return proto


def _to_onnx(fn: Any, sample_shape: tuple[int, ...], path: Path, input_name: str,
             output_name: str) -> Path:
    import onnx

    tf, tf2onnx = _tf(), _tf2onnx()
    spec = (tf.TensorSpec((None, *sample_shape), tf.float32, name=input_name),)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=OPSET)
    out = proto.graph.output[0].name
    canonical_onnx(proto, {out: output_name} if out != output_name else None)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path


def keras_to_onnx(km: Any, path: Path, input_name: str = "input",
                  output_name: str = "logits") -> Path:
    """Write the Keras model ``km`` (Keras 2 or 3, one input, one output) as ONNX.

    The graph takes the model's own layout (NHWC for Keras), so a caller feeds ONNX and
    TFLite the same array.
    """
    tf = _tf()
    shape = tuple(int(d) for d in km.input_shape[1:])
    fn = tf.function(lambda x: km(x, training=False))
    return _to_onnx(fn, shape, path, input_name, output_name)


@dataclass(frozen=True)
class SavedModelFn:
    """A SavedModel's serving signature: one float input, one output."""

    path: Path
    input_key: str
    output_key: str
    #: One sample's shape; ``None`` entries are dynamic (refused by the importer).
    sample_shape: tuple[int | None, ...] | None
    dtype: str
    fn: Any


def open_saved_model(path: Path) -> SavedModelFn:
    """Load the SavedModel at ``path`` and describe its ``serving_default`` signature."""
    tf = _tf()
    loaded = tf.saved_model.load(str(path))
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ValueError("the SavedModel has no serving_default signature")
    _, kwargs = sig.structured_input_signature
    if len(kwargs) != 1 or len(sig.structured_outputs) != 1:
        raise ValueError(f"expected one input and one output, the signature has inputs "
                         f"{sorted(kwargs)} and outputs {sorted(sig.structured_outputs)}")
    (key, spec), = kwargs.items()
    out_key = next(iter(sig.structured_outputs))
    dims = None if spec.shape.rank is None else tuple(spec.shape.as_list()[1:])

    def call(x: Any) -> Any:
        return sig(**{key: x})[out_key]

    # ``loaded`` must outlive the signature: keep it on the function object.
    call.loaded = loaded  # type: ignore[attr-defined]
    return SavedModelFn(path, key, out_key, dims, spec.dtype.name, call)


def _without_softmax(keras: Any, model: Any) -> tuple[Any, bool]:
    """``model`` ending in logits: a final softmax (activation or layer) is removed, since
    packages output logits and the device applies the temperature to them."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return keras.Model(model.inputs, last.input), True
    if getattr(last, "activation", None) is keras.activations.softmax:
        last.activation = keras.activations.linear
        return model, True
    return model, False


@contextmanager
def saved_model_for(source: Path) -> Iterator[tuple[Path, bool]]:
    """A SavedModel folder for ``source``, and whether a final softmax was removed: the
    folder itself, or a Keras file (without its softmax) exported to a temp dir.

    ``.keras`` files load with Keras 3 in safe mode (no deserialized Python lambdas).
    """
    if source.is_dir():
        yield source, False
        return
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-import-"))
    try:
        _tf()
        import keras

        model = keras.models.load_model(str(source), compile=False, safe_mode=True)
        model, stripped = _without_softmax(keras, model)
        model.export(str(tmp / "sm"), verbose=False)
        yield tmp / "sm", stripped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def saved_model_to_onnx(sm: SavedModelFn, sample_shape: tuple[int, ...], path: Path,
                        input_name: str = "input", output_name: str = "logits") -> Path:
    """Convert the signature ``sm`` to a self-contained fp32 ONNX file (opset 17)."""
    tf = _tf()
    return _to_onnx(tf.function(sm.fn), sample_shape, path, input_name, output_name)


class VariableMatchError(ValueError):
    """An array to replace matches no variable of the model, or several."""


def saved_model_with_weights(source: Path, dest: Path,
                             pairs: Sequence[tuple[F32, F32]]) -> list[str]:
    """Write the SavedModel ``dest``: ``source`` (a Keras file, final softmax removed, or a
    SavedModel) with each variable that holds one ``old`` array of ``pairs`` set to its
    ``new`` one; returns the variables' names in the order of ``pairs``.

    Variables are found by value, not by name: the ONNX graph's initializers are exact
    copies of them (a 2-D weight may be stored transposed). A pair that matches no
    variable, or several, is a :class:`VariableMatchError` naming it.
    """
    tf = _tf()
    with saved_model_for(source) as (sm_dir, _):
        loaded = tf.saved_model.load(str(sm_dir))
        variables = list(getattr(loaded, "variables", []))
        values = [np.asarray(v.numpy()) for v in variables]
        names: list[str] = []
        taken: set[int] = set()
        for k, (old, new) in enumerate(pairs):
            hits = []
            for i, val in enumerate(values):
                for transposed, want in ((False, old), (True, old.T)):
                    if (i not in taken and val.shape == want.shape
                            and np.allclose(val, want, rtol=1e-6, atol=1e-7)):
                        hits.append((i, transposed))
                        break
            if len(hits) != 1:
                raise VariableMatchError(f"head array {k} {old.shape} matches {len(hits)} "
                                         "variables of the TensorFlow source; expected "
                                         "exactly one")
            i, transposed = hits[0]
            variables[i].assign(np.asarray(new.T if transposed else new, np.float32)
                                .reshape(values[i].shape))
            taken.add(i)
            names.append(str(variables[i].name))
        tf.saved_model.save(loaded, str(dest), signatures=loaded.signatures)
    return names


def saved_model_to_tflite_int8(
    sm_dir: Path, representative: F32,
) -> tuple[bytes, QuantParams, QuantParams]:
    """Full-integer TFLite (int8 in and out) calibrated on ``representative`` (model inputs)."""
    from edgefleet.device.runtime.backends import _litert_interpreter

    tf = _tf()
    rep = np.asarray(representative, dtype=np.float32)[:MAX_REPRESENTATIVE]
    converter = tf.lite.TFLiteConverter.from_saved_model(str(sm_dir))

    def samples() -> Any:
        for i in range(len(rep)):
            yield [rep[i : i + 1]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = samples
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    blob: bytes = converter.convert()
    interp = _litert_interpreter()(model_content=blob)
    in_s, in_z = interp.get_input_details()[0]["quantization"]
    out_s, out_z = interp.get_output_details()[0]["quantization"]
    return (blob, QuantParams(scale=float(in_s), zero_point=int(in_z)),
            QuantParams(scale=float(out_s), zero_point=int(out_z)))
