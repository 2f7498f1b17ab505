"""Predictor on a real digits package: both backends, calibration, validation, refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.errors import InputError, ModelRejected, PackageError, UsageError
from edgefleet.device.metrics import Metrics
from edgefleet.device.package import load_package, write_manifest
from edgefleet.device.predictor import Prediction, Predictor
from edgefleet.models.mlp import softmax
from edgefleet.models.tasks import get_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    s = get_task("digits").split()
    return s.x_test, s.y_test


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_predict_accuracy_and_calibration(digits_package: Path, backend: str,
                                          test_split: tuple[np.ndarray, np.ndarray]) -> None:
    metrics = Metrics()
    p = Predictor.load(digits_package, backend=backend, metrics=metrics)
    assert p.variant == f"{backend}-int8"
    x, y = test_split
    preds = p.predict_batch(x)
    assert len(preds) == len(y)
    acc = np.mean([q.label for q in preds] == y)
    assert acc >= 0.93
    # Calibrated probabilities are softmax(logits / T) of the same variant's logits.
    want = softmax(p.logits(x), p.manifest.temperature)
    got = np.stack([q.probabilities for q in preds])
    np.testing.assert_allclose(got, want, atol=1e-5)
    one = p.predict(x[0])
    assert isinstance(one, Prediction)
    assert one.label == preds[0].label and one.label_name == p.manifest.labels[one.label]
    assert one.confidence == pytest.approx(float(one.probabilities.max()))
    assert one.probabilities.shape == (10,) and one.latency_ms > 0
    assert p.predict(x[:1]).label == one.label
    snap = metrics.snapshot()
    assert snap["counters"]["inferences"] == len(y) + 2
    assert snap["histograms"]["inference_latency_ms"]["count"] == 3
    assert snap["histograms"]["inference_confidence"]["count"] == len(y) + 2


def test_variant_and_backend_choice(digits_package: Path) -> None:
    assert Predictor.load(digits_package).variant == "onnx-int8"
    assert Predictor.load(digits_package, variant="onnx-fp32").variant == "onnx-fp32"
    with pytest.raises(UsageError):
        Predictor.load(digits_package, backend="tensorrt")
    with pytest.raises(UsageError):
        Predictor.load(digits_package, backend="tflite", variant="onnx-int8")
    with pytest.raises(PackageError):
        Predictor.load(digits_package, variant="tflite-fp32")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.zeros(63, np.float32), "shape"),
        (np.zeros((2, 8, 8), np.float32), "shape"),
        (np.zeros((0, 64), np.float32), "shape"),
        ([[1.0] * 64, [1.0] * 3], "shape"),
        (np.array(["a"] * 64), "dtype"),
        (np.zeros(64, np.complex64), "dtype"),
        (np.full(64, np.nan, np.float32), "nonfinite"),
        (np.concatenate([np.zeros(63), [np.inf]]), "nonfinite"),
        (np.full(64, 17.0), "range"),
        (np.full(64, -0.5), "range"),
        (np.full(64, 1e300), "nonfinite"),  # overflows float32
    ],
)
def test_bad_input_is_typed_and_counted(digits_package: Path, bad: object, reason: str) -> None:
    metrics = Metrics()
    p = Predictor.load(digits_package, metrics=metrics)
    with pytest.raises(InputError) as exc:
        p.predict(bad)
    assert exc.value.reason == reason
    assert str(exc.value)
    assert metrics.counter(f"inputs_invalid_{reason}") == 1
    assert metrics.counter("inferences") == 0
    # The predictor still answers afterwards.
    assert p.predict(np.zeros(64, np.int64)).label in range(10)


def test_predict_refuses_a_batch(digits_package: Path) -> None:
    p = Predictor.load(digits_package, metrics=Metrics())
    with pytest.raises(InputError) as exc:
        p.predict(np.zeros((2, 64), np.float32))
    assert exc.value.reason == "shape"


def _copy(pkg: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    return dst


def test_altered_file_is_refused(digits_package: Path, tmp_path: Path) -> None:
    pkg = _copy(digits_package, tmp_path)
    data = bytearray((pkg / "model_int8.tflite").read_bytes())
    data[len(data) // 2] ^= 0x01
    (pkg / "model_int8.tflite").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"model_int8\.tflite"):
        Predictor.load(pkg, backend="onnx")


def test_wrong_golden_is_refused(digits_package: Path, tmp_path: Path) -> None:
    pkg = _copy(digits_package, tmp_path)
    m = load_package(pkg)
    g = m.golden[0]
    g.logits["onnx-int8"] = [v + 5.0 for v in g.logits["onnx-int8"]]
    write_manifest(pkg, m)
    with pytest.raises(ModelRejected, match="onnx-int8"):
        Predictor.load(pkg, backend="onnx")
    assert Predictor.load(pkg, backend="tflite").variant == "tflite-int8"
