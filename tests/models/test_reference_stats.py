"""Built packages carry reference statistics that a device can score drift against."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.runtime.manifest import load_package
from edgefleet.models.core.tasks import get_task


@pytest.mark.slow
def test_package_has_reference_stats(digits_package: Path) -> None:
    m = load_package(digits_package)
    assert m.reference_stats is not None
    assert len(m.reference_stats["features"]["edges"]) == m.input.shape[0]
    assert m.reference_stats["confidence"]["probs"]
    mon = DriftMonitor.from_manifest(m, window=200)
    assert mon is not None
    split = get_task("digits").split()
    mon.observe(split.x_test[:200])
    score = mon.scores()["input_psi"]
    assert score is not None and score < 0.1


# -- imported packages (issue 16): the importer computes them on the user's eval data ------


def test_imported_package_has_reference_stats_that_score_drift(tmp_path: Path) -> None:
    import numpy as np

    from edgefleet.device.runtime.predictor import Predictor
    from tests.support.imported import image_model

    pkg = image_model(tmp_path)
    m = load_package(pkg)
    ref = m.reference_stats
    assert ref is not None and "pool" not in ref
    d = np.load(tmp_path / "eval.npz")
    x = d["x"]
    assert ref["samples"] == len(x) and len(ref["features"]["edges"]) == 64
    # The confidences are the default variant's, calibrated, on the eval data.
    p = Predictor.load(pkg, threads=1)
    assert p.variant == m.default_variant
    conf = np.array([q.confidence for q in p.predict_batch(x)], dtype=np.float32)
    mon = DriftMonitor.from_manifest(m, window=len(x))
    assert mon is not None
    mon.observe(x, conf)
    same = mon.scores()
    assert same["input_psi"] is not None and same["input_psi"] < 0.02
    assert same["confidence_psi"] is not None and same["confidence_psi"] < 0.02
    # Thicker strokes and sensor noise: the drift the device must report.
    shifted = np.clip(x * 1.6 + np.random.default_rng(0).normal(0, 3, x.shape), 0, 16)
    mon2 = DriftMonitor.from_manifest(m, window=len(x))
    assert mon2 is not None
    mon2.observe(shifted, [q.confidence for q in p.predict_batch(shifted)])
    moved = mon2.scores()
    assert moved["input_psi"] > 0.25 and moved["input_psi"] > moved["input_psi_noise"]


def test_wide_imported_inputs_are_pooled(tmp_path: Path) -> None:
    """384 raw values per sample: the reference holds 192 run means, and the device's
    monitor pools its raw rows the same way (same data: no drift; shifted: drift)."""
    from edgefleet.models.build.importer import MAX_DRIFT_FEATURES
    from tests.support.imported import window_model, windows_data

    m = load_package(window_model(tmp_path, window=128, channels=3))
    ref = m.reference_stats
    assert ref is not None and ref["pool"] == {"groups": 192, "size": 2}
    assert len(ref["features"]["edges"]) == 192 <= MAX_DRIFT_FEATURES
    x, _ = windows_data(300, 128, 3, seed=2)  # the eval data window_model imported
    mon = DriftMonitor.from_manifest(m, window=300)
    assert mon is not None
    mon.observe(x)
    assert mon.scores()["input_psi"] < 0.02
    mon.observe(x + 3.0)
    assert mon.scores()["input_psi"] > 1.0


def test_reference_stats_pool_only_above_the_limit() -> None:
    import numpy as np

    from edgefleet.device.inference.drift import pool_groups
    from edgefleet.models.core.reference_stats import reference_stats

    x = np.random.default_rng(0).normal(size=(50, 27648))  # 96x96x3
    assert pool_groups(27648, 256) == 256 and pool_groups(97, 64) == 1
    ref = reference_stats(x, max_features=256)
    assert ref["pool"] == {"groups": 256, "size": 108}
    assert "pool" not in reference_stats(x[:, :64], max_features=256)
