"""Predictor on a real digits package: both backends, calibration, validation, refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.errors import InputError, ModelRejected, PackageError, UsageError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import load_package, write_manifest
from edgefleet.device.runtime.mlp import softmax
from edgefleet.device.runtime.predictor import Prediction, Predictor
from edgefleet.models.core.tasks import get_task

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
@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_bad_input_is_typed_and_counted(digits_package: Path, bad: object, reason: str,
                                        backend: str) -> None:
    metrics = Metrics()
    p = Predictor.load(digits_package, backend=backend, metrics=metrics)
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
    # The trusted entry point still refuses a batch (it would answer for row 0 only).
    with pytest.raises(InputError) as exc:
        p.predict_validated(p.validate(np.zeros((2, 64), np.float32)))
    assert exc.value.reason == "shape"


def _softmax64(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_fast_path_matches_the_reference_pipeline(digits_package: Path, backend: str,
                                                  test_split: tuple[np.ndarray, np.ndarray]
                                                  ) -> None:
    """predict() against normalize → backend.run (sequential int8 quantization in the
    backend, as the golden check runs it) → softmax(logits / T)."""
    p = Predictor.load(digits_package, backend=backend, metrics=Metrics())
    x = test_split[0].astype(np.float32)
    norm = normalize(x, p.manifest.normalization)
    want = _softmax64(p.backend.run(norm), p.manifest.temperature)
    got = np.stack([p.predict(row).probabilities for row in x])
    same = np.ones(len(x), dtype=bool)
    if backend == "tflite":
        # The Predictor folds normalization into the quantization (x * a + b): at a
        # rounding tie that may move one int8 input by one step, never more.
        q_ref = p.backend.prepare(norm).astype(int)
        qa, qb = p._qa, p._qb
        assert qa is not None and qb is not None
        q_new = np.rint(np.clip(x * qa + qb, -128, 127)).astype(int)
        diff = np.abs(q_ref - q_new)
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
        same = ~diff.any(axis=1)
        assert same.mean() > 0.99
    np.testing.assert_allclose(got[same], want[same], rtol=0, atol=1e-9)
    assert np.array_equal(got.argmax(axis=1)[same], want.argmax(axis=1)[same])
    batch = np.stack([q.probabilities for q in p.predict_batch(x)])
    np.testing.assert_allclose(batch, got, rtol=0, atol=1e-12)


def test_int8_softmax_table_underflow_falls_back(digits_package: Path,
                                                 test_split: tuple[np.ndarray, np.ndarray]
                                                 ) -> None:
    """With a tiny temperature every table entry of a row can underflow to 0; the row is
    then computed from its own max, as the float path does."""
    base = Predictor.load(digits_package, backend="tflite", metrics=Metrics())
    m = base.manifest.model_copy(update={"temperature": 1e-4})
    p = Predictor(m, base.root, base.variant, base.backend, Metrics())
    x = test_split[0][:50].astype(np.float32)
    logits = p.logits(x)
    assert np.any(np.add.reduce(p._table.take(p._forward(p.validate(x))), axis=1) == 0)  # type: ignore[union-attr]
    for row, lg, q in zip(x, logits, p.predict_batch(x), strict=True):
        one = p.predict(row)
        want = _softmax64(lg[None, :], 1e-4)[0]
        assert np.all(np.isfinite(one.probabilities))
        np.testing.assert_allclose(one.probabilities, want, rtol=0, atol=1e-12)
        np.testing.assert_allclose(q.probabilities, want, rtol=0, atol=1e-12)
        assert one.label == int(np.argmax(lg)) == q.label


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


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_two_threads_get_their_own_answers(digits_package: Path, backend: str,
                                           test_split: tuple[np.ndarray, np.ndarray]) -> None:
    """The agent answers from two threads (inference loop, local API) on one Predictor."""
    import threading

    p = Predictor.load(digits_package, backend=backend, metrics=Metrics())
    x = test_split[0][:64].astype(np.float32)
    want = [p.predict(row).probabilities for row in x]
    wrong: list[int] = []

    def hammer(offset: int) -> None:
        for k in range(1500):
            i = (k * 7 + offset) % len(x)
            if not np.array_equal(p.predict(x[i]).probabilities, want[i]):
                wrong.append(i)

    threads = [threading.Thread(target=hammer, args=(o,)) for o in (0, 31)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_float32_bounds_accept_exactly_what_the_float64_bounds_accept() -> None:
    """The range check compares float32 inputs with float32 bounds rounded inwards."""
    from edgefleet.device.runtime.predictor import _f32_bound

    rng = np.random.default_rng(0)
    bounds = [0.1, -0.1, 1 / 3, 16.0, 1e-40, -1e-40, 3.5e38, -3.5e38, 1e300, -1e300,
              *rng.normal(0, 100, 200).tolist()]
    for b in bounds:
        lo, hi = _f32_bound(b, up=True), _f32_bound(b, up=False)
        # A lower bound never admits -inf, an upper bound never +inf.
        assert lo.dtype == hi.dtype == np.float32 and lo > -np.inf and hi < np.inf
        near = np.float32(np.clip(b, -3.4e38, 3.4e38))
        xs = np.array([np.nextafter(near, np.float32(-np.inf)), near,
                       np.nextafter(near, np.float32(np.inf)), np.inf, -np.inf, np.nan],
                      dtype=np.float32)
        with np.errstate(invalid="ignore"):
            assert np.array_equal(xs >= lo, xs.astype(np.float64) >= b), b
            assert np.array_equal(xs <= hi, xs.astype(np.float64) <= b), b
