"""The MobileNet-class benchmark model: one network, the same function in onnxruntime and LiteRT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.backends import open_backend
from edgefleet.models.build.vision import (
    MobileNetSpec,
    VisionExport,
    export_vision_variants,
    synthetic_images,
)

SPEC = MobileNetSpec(input_size=96, width=0.5, n_classes=10)


@pytest.fixture(scope="module")
def vision(tmp_path_factory: pytest.TempPathFactory) -> VisionExport:
    return export_vision_variants(SPEC, tmp_path_factory.mktemp("vision"), seed=0, n_calib=32)


def _logits(exp: VisionExport, key: str, x: np.ndarray) -> np.ndarray:
    return open_backend(exp.root, exp.variants[key], threads=1).run(x)


@pytest.mark.slow
def test_onnx_and_tflite_fp32_compute_the_same_function(vision: VisionExport) -> None:
    x = np.random.default_rng(7).uniform(-1, 1, (4, *SPEC.input_shape)).astype(np.float32)
    onnx_out = _logits(vision, "onnx-fp32", x)
    tflite_out = _logits(vision, "tflite-fp32", x)
    assert onnx_out.shape == (4, SPEC.n_classes)
    assert np.std(onnx_out) > 0.1  # not a degenerate constant output
    np.testing.assert_allclose(onnx_out, tflite_out, rtol=1e-4, atol=5e-4)


@pytest.mark.slow
def test_int8_variants_agree_with_fp32_on_argmax(vision: VisionExport) -> None:
    x = synthetic_images(32, SPEC.input_size, seed=11)
    ref = _logits(vision, "onnx-fp32", x).argmax(1)
    assert len(set(ref.tolist())) >= 4  # the random classifier separates the images
    for key in ("onnx-int8", "tflite-int8"):
        agree = float(np.mean(_logits(vision, key, x).argmax(1) == ref))
        assert agree >= 0.7, f"{key}: argmax agrees with fp32 on only {agree:.0%}"
    sizes = {k: (vision.root / v.file).stat().st_size for k, v in vision.variants.items()}
    assert sizes["onnx-int8"] < 0.35 * sizes["onnx-fp32"]
    assert sizes["tflite-int8"] < 0.35 * sizes["tflite-fp32"]


def test_synthetic_images_are_deterministic_and_in_range() -> None:
    a, b = synthetic_images(5, 32, seed=3), synthetic_images(5, 32, seed=3)
    assert a.shape == (5, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not np.allclose(a[0], a[1])
    assert not np.array_equal(a, synthetic_images(5, 32, seed=4))


@pytest.mark.slow
def test_keras_to_onnx_converts_layers_beyond_the_mobilenet_chain(tmp_path: Path) -> None:
    # tf2onnx replaced a hand-written exporter that knew only Conv/BN/ReLU6 chains.
    from edgefleet.device.runtime.manifest import Variant
    from edgefleet.models.build.tf_convert import keras_to_onnx
    from edgefleet.models.build.tflite_export import _import_tf

    keras = _import_tf()[1]
    km = keras.Sequential([keras.layers.InputLayer(input_shape=(8, 8, 3)),
                           keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                           keras.layers.Dense(2)])
    keras_to_onnx(km, tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    got = open_backend(tmp_path, Variant(file="m.onnx", format="onnx", precision="fp32"),
                       threads=1).run(x)
    np.testing.assert_allclose(got, km(x).numpy(), atol=1e-5)
