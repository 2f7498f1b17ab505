"""The vibration task: deterministic physical data, fault signatures, an int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.input.features import BAND_EDGES_HZ, N_BANDS, band_energies
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.core.tasks import get_task, task_names
from edgefleet.models.core.vibration import LABELS, generate_windows
from tests.conftest import run_cli


def _band(freq: float) -> int:
    return int(np.searchsorted(BAND_EDGES_HZ, freq, side="right") - 1)


def test_registered_and_deterministic() -> None:
    assert "vibration" in task_names()
    task = get_task("vibration")
    assert task.labels == LABELS and task.n_features == 3 * N_BANDS
    a, ya = generate_windows(per_class=6, seed=5)
    b, yb = generate_windows(per_class=6, seed=5)
    c, _ = generate_windows(per_class=6, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a, c)
    assert np.bincount(ya).tolist() == [6] * len(LABELS)


def test_extra_calibration_windows_are_disjoint_and_only_in_the_pool() -> None:
    """τ gets 3500 more calibration windows; the split itself (FL, temperature) is unchanged."""
    from edgefleet.models.core.vibration import CALIB_EXTRA_PER_CLASS

    task = get_task("vibration")
    split = task.split()
    x, y = task.calib_pool()
    extra = CALIB_EXTRA_PER_CLASS * len(LABELS)
    assert len(y) == len(split.y_calib) + extra
    np.testing.assert_array_equal(x[: len(split.y_calib)], split.x_calib)
    assert np.bincount(y[len(split.y_calib):]).tolist() == [CALIB_EXTRA_PER_CLASS] * len(LABELS)
    seen = {r.tobytes() for r in np.concatenate([split.x_train, split.x_test])}
    assert not any(r.tobytes() in seen for r in x[len(split.y_calib):])
    assert len(split.y_calib) == 420  # the split did not grow
    digits = get_task("digits")
    assert len(digits.calib_pool()[1]) == len(digits.split().y_calib)  # no extra: unchanged


def test_fault_signatures() -> None:
    """Each class shows the physics it is documented to have, on average."""
    w, y = generate_windows(per_class=60, seed=1)
    f = band_energies(w).reshape(len(y), 3, N_BANDS)
    power = 10.0 ** f
    low = slice(_band(20), _band(40) + 1)  # 1x at 20..40 Hz
    high = slice(_band(1000), N_BANDS)  # bearing resonances
    radial_1x = power[:, 0, low].sum(1)
    axial = power[:, 2, : _band(90) + 1].sum(1)
    hf = power[:, :, high].sum((1, 2))

    def mean(v: np.ndarray, name: str) -> float:
        return float(np.median(v[y == LABELS.index(name)]))

    assert mean(radial_1x, "imbalance") > 3 * mean(radial_1x, "healthy")
    assert mean(axial, "misalignment") > 3 * mean(axial, "healthy")
    assert mean(hf, "bearing_defect") > 3 * mean(hf, "healthy")
    assert mean(hf, "bearing_defect") > 2 * mean(hf, "imbalance")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_build_vibration_int8(tmp_path: Path) -> None:
    out = tmp_path / "vib"
    proc = run_cli("models", "build", "--task", "vibration", "--out", str(out), "--format", "all",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)["metrics"]
    for key in ("onnx-int8", "tflite-int8"):
        assert metrics[key]["accuracy"] >= 0.9
    assert metrics["onnx-fp32"]["accuracy"] < 0.995  # not a trivial task
    # The device path: raw windows → device features → Predictor.
    w, y = generate_windows(per_class=20, seed=99)
    pred = Predictor.load(out, backend="tflite")
    got = [p.label for p in pred.predict_batch(band_energies(w))]
    assert np.mean(np.asarray(got) == y) >= 0.85
