"""A MobileNet-class vision model, defined once and exported to ONNX and TFLite (fp32 and int8).

The digits MLP is too small to show what int8 buys on a device, so the quantization
benchmark also runs a MobileNetV1-style network (depthwise-separable convolutions, ReLU6).
Latency does not depend on weight values, so the weights are random; the batch-norm
statistics are set from one batch of synthetic images so that activations keep a sane
range through all layers and int8 calibration sees realistic distributions.

The network is built in Keras (tf-keras) and converted to TFLite by the same code as the
digits model, and to ONNX by tf2onnx (:func:`~.tf_convert.keras_to_onnx`, the converter
``models import`` uses), so both runtimes run the same function. TensorFlow is imported
only when a model is built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.runtime.manifest import Variant
from edgefleet.models.build.onnx_export import quantize_onnx_int8
from edgefleet.models.build.tf_convert import keras_to_onnx

__all__ = [
    "MobileNetSpec",
    "VisionExport",
    "build_mobilenet_v1",
    "export_vision_variants",
    "synthetic_images",
]

F32 = npt.NDArray[np.float32]

#: MobileNetV1's depthwise-separable blocks: (pointwise filters at width 1.0, stride).
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
BN_EPS = 1e-3


@dataclass(frozen=True)
class MobileNetSpec:
    """Input resolution, width multiplier and classes of a MobileNetV1-style network."""

    input_size: int = 128
    width: float = 1.0
    n_classes: int = 1000
    channels: int = 3

    @property
    def label(self) -> str:
        """A short human name, e.g. ``MobileNetV1 1.0 128x128``."""
        width = f"{self.width:g}" if self.width % 1 else f"{self.width:.1f}"
        return f"MobileNetV1 {width} {self.input_size}x{self.input_size}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample, NHWC without the batch."""
        return (self.input_size, self.input_size, self.channels)


@dataclass(frozen=True)
class VisionExport:
    """The four files of one vision model and the variants that open them."""

    root: Path
    variants: dict[str, Variant]
    n_params: int


def synthetic_images(n: int, size: int, channels: int = 3, seed: int = 0) -> F32:
    """``n`` structured images in [-1, 1] (MobileNet's input range), NHWC.

    Each image is a sum of a few random oriented gratings plus a per-channel offset, so
    images differ in their global statistics (pure i.i.d. noise averages out after global
    pooling and every image would look the same to the classifier).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, size, size, channels), dtype=np.float32)
    for i in range(n):
        img = rng.normal(0, 0.3, channels)[None, None, :] * np.ones((size, size, 1))
        for _ in range(3):
            freq, angle, phase = rng.uniform(1, 8), rng.uniform(0, np.pi), rng.uniform(0, 6.3)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            img += wave[:, :, None] * rng.uniform(0.1, 0.5, channels)[None, None, :]
        out[i] = np.clip(img + rng.normal(0, 0.05, img.shape), -1, 1)
    return out


def _import_keras() -> Any:
    from edgefleet.models.build.tflite_export import _import_tf

    return _import_tf()[1]


def build_mobilenet_v1(spec: MobileNetSpec, calib: F32 | None = None, seed: int = 0) -> Any:
    """A tf-keras MobileNetV1-style model with random weights, outputting logits.

    Batch-norm moving statistics are set to the per-layer batch statistics of ``calib``
    (default: 32 synthetic images), a data-dependent initialization that keeps the random
    network's activations well scaled.
    """
    keras = _import_keras()
    layers = keras.layers

    def ch(filters: int) -> int:
        return max(8, int(filters * spec.width))

    def bn_relu6(x: Any, name: str) -> Any:
        x = layers.BatchNormalization(epsilon=BN_EPS, momentum=0.0, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu6")(x)

    inp = keras.Input(shape=spec.input_shape, name="input")
    x = layers.Conv2D(ch(32), 3, strides=2, padding="same", use_bias=False, name="conv0")(inp)
    x = bn_relu6(x, "conv0")
    for i, (filters, stride) in enumerate(V1_BLOCKS, start=1):
        x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                   name=f"dw{i}")(x)
        x = bn_relu6(x, f"dw{i}")
        x = layers.Conv2D(ch(filters), 1, use_bias=False, name=f"pw{i}")(x)
        x = bn_relu6(x, f"pw{i}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    out = layers.Dense(spec.n_classes, name="logits")(x)
    model = keras.Model(inp, out, name="mobilenet_v1")

    # gamma near 1 and a positive beta keep most ReLU6 units in their linear range: a
    # random BN network is otherwise chaotic and amplifies int8 rounding noise layer by
    # layer, so int8 argmax would disagree with fp32 far more than on a trained network.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D | layers.Dense):
            # NumPy, not Keras initializers: the same seed gives the same weights whatever
            # TensorFlow ran before in this process.
            weights = [rng.normal(0, 1 / math.sqrt(math.prod(w.shape[:-1])), w.shape)
                       if w.ndim > 1 else np.zeros_like(w) for w in layer.get_weights()]
            layer.set_weights([w.astype(np.float32) for w in weights])
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.8, 1.2, n).astype(np.float32))
            layer.beta.assign(rng.normal(1.0, 0.5, n).astype(np.float32))
    if calib is None:
        calib = synthetic_images(32, spec.input_size, spec.channels, seed=seed + 1)
    # momentum=0: one training-mode pass sets every moving mean/variance to this batch's.
    model(calib, training=True)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.99
    # Standardize the pooled features inside the classifier: otherwise their common
    # (all-positive, ReLU6) mean picks the same few classes for every image.
    feats = np.asarray(keras.Model(inp, x)(calib, training=False), dtype=np.float64)
    mean, std = feats.mean(0), feats.std(0) + 1e-3
    kernel, _ = model.get_layer("logits").get_weights()
    kernel = kernel / std[:, None]
    model.get_layer("logits").set_weights([kernel.astype(np.float32),
                                           (-(mean @ kernel)).astype(np.float32)])
    return model


def export_vision_variants(
    spec: MobileNetSpec, root: Path, *, seed: int = 0, n_calib: int = 64,
    extra_onnx: Sequence[tuple[str, dict[str, Any]]] = (),
) -> VisionExport:
    """Build one random MobileNet and write it as ONNX and TFLite, fp32 and int8, in ``root``.

    int8 ONNX is onnxruntime's static QDQ quantization (per-channel weights, int8
    activations); int8 TFLite is full-integer with int8 input and output. Both calibrate
    on the same synthetic images. ``extra_onnx`` adds further int8 ONNX variants as
    ``(key, quantize_onnx_int8 keyword arguments)``, e.g. the QOperator format.
    """
    from edgefleet.models.build.tflite_export import keras_to_tflite

    root.mkdir(parents=True, exist_ok=True)
    calib = synthetic_images(n_calib, spec.input_size, spec.channels, seed=seed + 2)
    km = build_mobilenet_v1(spec, seed=seed)
    keras_to_onnx(km, root / "model_fp32.onnx")
    quantize_onnx_int8(root / "model_fp32.onnx", root / "model_int8.onnx", calib)
    variants = {
        "onnx-fp32": Variant(file="model_fp32.onnx", format="onnx", precision="fp32"),
        "onnx-int8": Variant(file="model_int8.onnx", format="onnx", precision="int8"),
    }
    for key, options in extra_onnx:
        fname = f"model_{key}.onnx"
        quantize_onnx_int8(root / "model_fp32.onnx", root / fname, calib, **options)
        variants[key] = Variant(file=fname, format="onnx", precision="int8")
    blob, _, _ = keras_to_tflite(km, None)
    (root / "model_fp32.tflite").write_bytes(blob)
    variants["tflite-fp32"] = Variant(file="model_fp32.tflite", format="tflite", precision="fp32")
    blob, in_q, out_q = keras_to_tflite(km, calib)
    (root / "model_int8.tflite").write_bytes(blob)
    variants["tflite-int8"] = Variant(file="model_int8.tflite", format="tflite",
                                      precision="int8", input_quant=in_q, output_quant=out_q)
    return VisionExport(root, variants, int(km.count_params()))
