"""PSI drift against the package's reference statistics."""

from __future__ import annotations

import numpy as np

from edgefleet.device.inference.drift import DriftMonitor, histogram_probs, psi
from edgefleet.models.core.reference_stats import quantile_edges, reference_stats
from edgefleet.models.core.tasks import get_task


def test_psi_basics() -> None:
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.25
    edges = quantile_edges(np.arange(100.0), 10)
    assert len(edges) == 9
    assert np.allclose(histogram_probs(np.arange(100.0), edges), 0.1)
    assert quantile_edges(np.zeros(50)) == []  # a constant feature: one bin


def test_digits_reference_and_drift() -> None:
    split = get_task("digits").split()
    rng = np.random.default_rng(0)
    conf_ref = rng.beta(8, 1, size=2000)
    ref = reference_stats(split.x_train, conf_ref)
    assert len(ref["features"]["edges"]) == split.x_train.shape[1]
    for probs in ref["features"]["probs"]:
        assert abs(sum(probs) - 1.0) < 1e-3

    same = DriftMonitor(ref, window=300)
    same.observe(split.x_test[:300], rng.beta(8, 1, size=300))
    s = same.scores()
    assert s["window"] == 300
    assert s["input_psi"] is not None and s["input_psi"] < 0.1
    assert s["confidence_psi"] is not None and s["confidence_psi"] < 0.1

    shifted = DriftMonitor(ref, window=300)
    inverted = 16.0 - split.x_test[:300]  # a sensor that reads inverted
    for row in inverted:
        shifted.observe(row, float(rng.beta(2, 2)))  # and a model that got unsure
    d = shifted.scores()
    assert d["input_psi"] is not None and d["input_psi"] > 0.25
    assert d["confidence_psi"] is not None and d["confidence_psi"] > 0.25


def test_too_few_samples_gives_none() -> None:
    ref = reference_stats(np.random.default_rng(1).normal(size=(500, 3)))
    mon = DriftMonitor(ref, window=100, min_samples=50)
    mon.observe(np.zeros((10, 3)))
    assert mon.scores()["input_psi"] is None
    assert mon.scores()["confidence_psi"] is None
