"""Full-integer TFLite export (int8 in, int8 out) via TensorFlow, with optional QAT and pruning.

The Keras model is rebuilt from the NumPy MLP's weights, optionally pruned to a
sparsity (``tensorflow-model-optimization`` magnitude pruning) and/or fine-tuned with
quantization-aware training, then converted with a representative data set. Only this
module imports TensorFlow; a device never needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import MissingExtraError
from edgefleet.device.runtime.backends import _litert_interpreter
from edgefleet.device.runtime.manifest import QuantParams
from edgefleet.device.runtime.mlp import MLP

__all__ = ["TFLiteExport", "export_tflite_fp32", "export_tflite_int8", "keras_to_tflite"]


@dataclass(frozen=True)
class TFLiteExport:
    """What the manifest needs to know about the exported file."""

    path: Path
    input_quant: QuantParams
    output_quant: QuantParams
    sparsity: float


def _import_tf() -> tuple[Any, Any]:
    # tensorflow-model-optimization works on Keras 2 (tf-keras), not Keras 3.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
        import tf_keras as keras
    except ImportError:
        raise MissingExtraError("TFLite export", "models", "tensorflow") from None
    return tf, keras


def _keras_model(keras: Any, model: MLP) -> Any:
    layers = [keras.layers.InputLayer(input_shape=(model.sizes[0],))]
    for i in range(model.n_layers):
        act = None if i == model.n_layers - 1 else "relu"
        layers.append(keras.layers.Dense(model.sizes[i + 1], activation=act, name=f"dense{i}"))
    km = keras.Sequential(layers)
    for i in range(model.n_layers):
        km.get_layer(f"dense{i}").set_weights([model.params[2 * i], model.params[2 * i + 1]])
    return km


def _fine_tune(keras: Any, km: Any, x: npt.NDArray[np.float32] | None,
               y: npt.NDArray[np.int64] | None, epochs: int, callbacks: list[Any]) -> None:
    if x is None or y is None:
        raise ValueError("QAT and pruning need training data")
    km.compile(optimizer=keras.optimizers.Adam(1e-3),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    km.fit(x, y, epochs=epochs, batch_size=32, verbose=0, shuffle=True, callbacks=callbacks)


def export_tflite_int8(
    model: MLP,
    path: Path,
    calib_x: npt.NDArray[np.float32],
    train_x: npt.NDArray[np.float32] | None = None,
    train_y: npt.NDArray[np.int64] | None = None,
    *,
    qat: bool = False,
    prune: float = 0.0,
    seed: int = 0,
    fine_tune_epochs: int = 8,
) -> TFLiteExport:
    """Convert ``model`` to a full-integer TFLite file; inputs are normalized features."""
    if not 0.0 <= prune < 1.0:
        raise ValueError("prune must be in [0, 1)")
    tf, keras = _import_tf()
    tf.random.set_seed(seed)
    km = _keras_model(keras, model)
    if (qat or prune > 0) and (train_x is None or train_y is None):
        raise ValueError("QAT and pruning need training data")
    sparsity = 0.0
    if prune > 0:
        import tensorflow_model_optimization as tfmot

        schedule = tfmot.sparsity.keras.ConstantSparsity(prune, begin_step=0, frequency=10)
        km = tfmot.sparsity.keras.prune_low_magnitude(km, pruning_schedule=schedule)
        _fine_tune(keras, km, train_x, train_y, fine_tune_epochs,
                   [tfmot.sparsity.keras.UpdatePruningStep()])
        km = tfmot.sparsity.keras.strip_pruning(km)
        kernels = [w for w in km.get_weights() if w.ndim == 2]
        sparsity = float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels))
    if qat:
        import tensorflow_model_optimization as tfmot

        km = tfmot.quantization.keras.quantize_model(km)
        _fine_tune(keras, km, train_x, train_y, fine_tune_epochs, [])

    blob, in_q, out_q = keras_to_tflite(km, calib_x)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    if in_q is None or out_q is None:  # a full-integer conversion always has them
        raise RuntimeError("TFLite int8 conversion produced no quantization parameters")
    return TFLiteExport(path, in_q, out_q, sparsity)


def export_tflite_fp32(model: MLP, path: Path) -> Path:
    """Write ``model`` as a float32 TFLite file (the LiteRT baseline for int8 comparisons)."""
    _, keras = _import_tf()
    blob, _, _ = keras_to_tflite(_keras_model(keras, model), None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def keras_to_tflite(
    km: Any, representative: npt.NDArray[np.float32] | None, max_samples: int = 300,
) -> tuple[bytes, QuantParams | None, QuantParams | None]:
    """Convert a Keras model to TFLite: float32, or full-integer (int8 in/out) when given data.

    Returns the flatbuffer and the input/output quantization (``None`` for float32). The
    parameters are read back with LiteRT, the interpreter a device runs, so the export
    does not depend on TensorFlow's deprecated ``tf.lite.Interpreter``.
    """
    tf, _ = _import_tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(km)
    if representative is not None:
        rep = np.asarray(representative, dtype=np.float32)

        def samples() -> Any:
            for i in range(min(len(rep), max_samples)):
                yield [rep[i : i + 1]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    blob: bytes = converter.convert()
    if representative is None:
        return blob, None, None
    interp = _litert_interpreter()(model_content=blob)
    in_s, in_z = interp.get_input_details()[0]["quantization"]
    out_s, out_z = interp.get_output_details()[0]["quantization"]
    return (blob, QuantParams(scale=float(in_s), zero_point=int(in_z)),
            QuantParams(scale=float(out_s), zero_point=int(out_z)))
