"""``models import`` on a real architecture: Keras' MobileNetV2 0.35 at 96x96x3.

Depthwise convolutions, ReLU6, batch norm and residual adds through tf2onnx, onnxruntime
quantization and the TFLite converter; the numbers are in docs/bench/mobilenetv2.md
(scripts/bench_mobilenetv2.py). Architecture only (``weights=None``): nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.importer import ImportOptions, import_model
from tests.support.byom import FLOAT_COMPUTE, int8_graph_ops

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_mobilenetv2_imports_with_its_head_cut_and_matches_keras(tmp_path: Path) -> None:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    from edgefleet.models.build.tflite_export import _import_tf

    _import_tf()
    import keras

    d = load_digits()
    imgs = zoom(d.images[:160].astype(np.float32), (1, 12, 12), order=1).clip(0, 16)
    x = np.repeat(imgs[..., None], 3, axis=-1).astype(np.float32)
    y = d.target[:160].astype(np.int64)
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3),
                                           classes=10)
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x[:96] / 8 - 1, y[:96], epochs=1, batch_size=32, verbose=0)
    model.save(tmp_path / "mnv2.keras")
    np.savez(tmp_path / "calib.npz", x=x[96:128], y=y[96:128])
    np.savez(tmp_path / "eval.npz", x=x[128:], y=y[128:])

    import_model(ImportOptions(model=tmp_path / "mnv2.keras", calibration=tmp_path / "calib.npz",
                               eval=tmp_path / "eval.npz", out=tmp_path / "pkg", scale=1 / 8,
                               mean=(1.0,), methods=("minmax",)))

    manifest = load_package(tmp_path / "pkg")
    assert set(manifest.variants) == {"onnx-fp32", "onnx-int8", "tflite-int8"}
    assert manifest.head is not None
    assert (manifest.head.op, manifest.head.dim) == ("MatMul", 1280)
    # the graph's names are short; the lineage keeps the head's tf2onnx (Keras) names
    assert manifest.lineage["model"]["short_names"] is True
    assert "predictions" in manifest.lineage["model"]["source_names"]["head_node"]
    # The package's fp32 graph computes Keras' logits (softmax removed) from raw pixels.
    model.layers[-1].activation = keras.activations.linear
    want = keras.ops.convert_to_numpy(model(x[128:] / 8 - 1, training=False))
    fp32 = Predictor.load(tmp_path / "pkg", variant="onnx-fp32", threads=1)
    np.testing.assert_allclose(fp32.logits(x[128:]), want, atol=1e-3)
    # Every convolution, residual add and the dense layer run as integer kernels in
    # onnxruntime's optimized int8 graph (no float DequantizeLinear->op->QuantizeLinear).
    _, ops = int8_graph_ops(tmp_path / "pkg" / "model_int8.onnx")
    assert ops["QLinearConv"] == 52 and ops["QLinearAdd"] == 10 and ops["QGemm"] == 1, ops
    assert not FLOAT_COMPUTE & set(ops), ops
    for name in ("onnx-int8", "tflite-int8"):  # each passes its golden check on load
        pred = Predictor.load(tmp_path / "pkg", variant=name, threads=1)
        assert pred.logits(x[128:]).shape == (32, 10)
