"""Inputs by spec: every input path's array becomes the imported model's samples, checked.

Against real imported packages (tests/support/imported.py: an 8x8x1 NHWC digits model
with ``scale = 1/16``, and an NWC window model with mean/std); the preprocessing must
reach the model exactly once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.input.model_input import ModelInput
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.input_spec import InputAdapter, describe
from edgefleet.device.runtime.manifest import InputSpec, load_package
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.wire.frames import Frame, PayloadType
from tests.support.imported import image_model, window_model, windows_data


@pytest.fixture(scope="module")
def image_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_model(tmp_path_factory.mktemp("img"))


@pytest.fixture(scope="module")
def window_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return window_model(tmp_path_factory.mktemp("win"))


def _eval(pkg: Path) -> tuple[np.ndarray, np.ndarray]:
    d = np.load(pkg.parent / "eval.npz")
    return d["x"], d["y"]


def test_every_accepted_form_gives_the_same_samples(image_pkg: Path) -> None:
    m = load_package(image_pkg)
    a = InputAdapter(m.input, Metrics())
    x, _ = _eval(image_pkg)
    one = x[0]
    want = one[None].astype(np.float32)
    for form in (one, one[..., 0], one.reshape(64), one.astype(np.uint8),
                 one.astype(np.float64), one.tolist()):
        got = a.batch(form)
        assert got.shape == (1, 8, 8, 1) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    batch = a.batch(x[:5].reshape(5, 64))
    np.testing.assert_array_equal(batch, x[:5])
    np.testing.assert_array_equal(a.batch(x[:5, ..., 0]), x[:5])
    # The local API's "image": raw uint8 bytes, as the row it makes of them.
    raw = np.frombuffer(one.astype(np.uint8).tobytes(), dtype=np.uint8)[None, :]
    np.testing.assert_array_equal(a.batch(raw), want)


def test_preprocessing_reaches_the_model_exactly_once(image_pkg: Path) -> None:
    """Predictor on adapter output == the fp32 graph on (x * scale - mean) / std by hand."""
    m = load_package(image_pkg)
    assert m.input.preprocessing is not None and m.input.preprocessing.scale == 1 / 16
    x, y = _eval(image_pkg)
    p = Predictor.load(image_pkg, variant="onnx-fp32", threads=1, metrics=Metrics())
    got = p.logits(InputAdapter(m.input, Metrics()).batch(x))
    raw_graph = open_backend(image_pkg, m.variant("onnx-fp32"), threads=1)
    once = raw_graph.run((x * (1 / 16)).reshape(len(x), 64).astype(np.float32))
    twice = raw_graph.run((x * (1 / 256)).reshape(len(x), 64).astype(np.float32))
    np.testing.assert_allclose(got, once, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, twice, atol=1e-2)
    assert np.mean(got.argmax(1) == y) > 0.9


@pytest.mark.parametrize(("bad", "reason", "words"), [
    (np.zeros((8, 8, 3)), "channels", "3 channel(s), not 1"),
    (np.zeros((2, 8, 8, 2)), "channels", "2 channel(s), not 1"),
    (np.zeros((7, 8, 1)), "size", "image of shape [7, 8, 1]"),
    (np.zeros(63), "count", "63 values"),
    (np.zeros((2, 32)), "count", "[2, 32] (64 values)"),  # 64 values, not reshaped
    (np.zeros((4, 16, 1)), "size", "image of shape [4, 16, 1]"),
    (np.array(["a"] * 64), "dtype", "dtype <U1"),
    (np.zeros(64, dtype=complex), "dtype", "complex"),
    (np.full(64, np.nan), "nonfinite", "NaN/inf"),
    (np.full(64, 1e300), "nonfinite", "beyond float32"),
    (np.zeros((0, 64)), "batch", "batch of 0"),
    (np.zeros((5000, 64)), "batch", "batch of 5000"),
])
def test_image_mismatches_are_named_and_counted(image_pkg: Path, bad: np.ndarray, reason: str,
                                                words: str) -> None:
    metrics = Metrics()
    a = InputAdapter(load_package(image_pkg).input, metrics)
    with pytest.raises(InputError) as exc:
        a.batch(bad)
    assert exc.value.reason == reason
    assert words in str(exc.value)
    assert "expected float32 [8, 8, 1] (NHWC: 8x8 image, 1 channel(s))" in str(exc.value)
    assert metrics.counter(f"input_rejected_{reason}") == 1
    assert sum(v for k, v in metrics.snapshot()["counters"].items()
               if k.startswith("input_rejected_")) == 1


def test_image_bytes_of_the_wrong_length(image_pkg: Path) -> None:
    """The local API's row of 63 raw bytes for a 64-value image (also end to end in
    tests/e2e/test_inputs_by_spec.py)."""
    metrics = Metrics()
    a = InputAdapter(load_package(image_pkg).input, metrics)
    with pytest.raises(InputError, match=r"\(63 values\).*expected float32 \[8, 8, 1\]") as exc:
        a.batch(np.frombuffer(bytes(63), dtype=np.uint8)[None, :])
    assert exc.value.reason == "count" and metrics.counter("input_rejected_count") == 1


@pytest.mark.parametrize(("bad", "reason", "words"), [
    (np.zeros((15, 3)), "window", "window of 15 samples, not 16"),
    (np.zeros((4, 17, 3)), "window", "window of 17 samples, not 16"),
    (np.zeros((16, 2)), "channels", "2 channel(s), not 3"),
    (np.zeros(47), "count", "47 values"),
])
def test_window_mismatches_are_named_and_counted(window_pkg: Path, bad: np.ndarray,
                                                 reason: str, words: str) -> None:
    metrics = Metrics()
    a = InputAdapter(load_package(window_pkg).input, metrics)
    with pytest.raises(InputError) as exc:
        a.batch(bad)
    assert exc.value.reason == reason and words in str(exc.value)
    assert "expected float32 [16, 3] (NWC: 16 samples x 3 channels)" in str(exc.value)
    assert metrics.counter(f"input_rejected_{reason}") == 1


def test_a_builtin_flat_spec_keeps_its_row_contract() -> None:
    spec = InputSpec(shape=[64])
    assert describe(spec) == "float32 [64] (64 values)"
    a = InputAdapter(spec, Metrics())
    assert a.batch(np.zeros(64)).shape == (1, 64)
    assert a.batch(np.zeros((3, 64))).shape == (3, 64)
    with pytest.raises(InputError) as exc:
        a.batch(np.zeros((3, 65)))
    assert exc.value.reason == "count"


def _frame(seq: int, values: np.ndarray, ptype: PayloadType = PayloadType.F32_VECTOR,
           sensor: int = 1) -> Frame:
    data = values.astype("<f4").tobytes() if ptype != PayloadType.U8_VECTOR else \
        values.astype(np.uint8).tobytes()
    return Frame(sensor, seq, 0, int(ptype), data)


def test_model_input_frames_for_an_image_model(image_pkg: Path) -> None:
    metrics = Metrics()
    mi = ModelInput(load_package(image_pkg), metrics=metrics)
    x, _ = _eval(image_pkg)
    [got] = mi.frame(_frame(0, x[3].reshape(64), PayloadType.U8_VECTOR))
    np.testing.assert_array_equal(got, x[3])
    with pytest.raises(InputError) as exc:
        mi.frame(_frame(1, np.zeros(60)))
    assert exc.value.reason == "count" and metrics.counter("input_rejected_count") == 1


def test_model_input_frames_for_a_window_model(window_pkg: Path) -> None:
    """Frames of 4 samples x 3 channels become 16-sample windows; the model's class is
    the hot channel, so a window assembled out of order or mixed up answers wrong."""
    metrics = Metrics()
    m = load_package(window_pkg)
    mi = ModelInput(m, metrics=metrics)
    p = Predictor.load(window_pkg, threads=1, metrics=Metrics())
    xs, ys = windows_data(6, 16, 3, seed=5)
    stream = xs.reshape(-1, 3)
    windows = []
    for seq, i in enumerate(range(0, len(stream), 4)):
        windows += mi.frame(_frame(seq, stream[i:i + 4].reshape(-1)))
    assert len(windows) == 6
    np.testing.assert_array_equal(np.stack(windows), xs)
    assert [p.predict(w).label for w in windows] == ys.tolist()


def test_builtin_packages_keep_the_vibration_features(digits_package: Path) -> None:
    mi = ModelInput(load_package(digits_package), metrics=Metrics())
    assert mi.builtin and mi.windows is None
    [row] = mi.frame(_frame(0, np.arange(64) % 17, PayloadType.U8_VECTOR))
    assert row.shape == (64,)


@pytest.mark.parametrize("std", [[0.0], [1.0, -2.0]])
def test_a_std_that_is_not_positive_is_refused_where_a_package_declares_one(
        std: list[float]) -> None:
    """Both the declared preprocessing and the per-feature normalization divide by std."""
    from pydantic import ValidationError

    from edgefleet.device.runtime.manifest import Normalization, Preprocessing

    for make in (lambda: Preprocessing(std=std), lambda: Normalization(mean=[0.0], std=std)):
        with pytest.raises(ValidationError, match="every std must be > 0"):
            make()
