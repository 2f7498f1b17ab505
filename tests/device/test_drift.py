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


def test_chi2_quantile_matches_scipy_and_is_conservative() -> None:
    from scipy.stats import chi2

    from edgefleet.device.inference.drift import NOISE_Z, chi2_quantile

    assert chi2_quantile(0) == 0.0
    for df in (1, 2, 3, 5, 9, 20, 63):
        exact = float(chi2.ppf(1 - 1e-4, df))
        approx = chi2_quantile(df, NOISE_Z)
        assert exact <= approx <= exact * 1.075, (df, exact, approx)


def test_noise_level_shrinks_with_the_window_and_bounds_clean_psi() -> None:
    """The noise level is what a no-drift window reaches at most once in 1,000: clean
    100-sample windows (the shortest scored) from the reference's own law stay under it."""
    from edgefleet.device.inference.drift import psi_noise

    assert psi_noise(1, 100, 500) == 0.0  # one bin: PSI is always 0
    levels = [psi_noise(10, n, 1000) for n in (100, 200, 500)]
    assert levels[0] > levels[1] > levels[2] > 0
    assert psi_noise(10, 100) < psi_noise(10, 100, 1000)  # the reference's own noise adds
    rng = np.random.default_rng(3)
    ref = reference_stats(rng.normal(size=(1000, 1)), rng.beta(8, 1, size=1000))
    over = 0
    for seed in range(200):
        r = np.random.default_rng(100 + seed)
        mon = DriftMonitor(ref, window=100)
        mon.observe(r.normal(size=(100, 1)), r.beta(8, 1, size=100))
        s = mon.scores()
        assert s["input_psi_noise"] is not None and s["confidence_psi_noise"] is not None
        over += s["input_psi"] > s["input_psi_noise"]  # type: ignore[operator]
        over += s["confidence_psi"] > s["confidence_psi_noise"]  # type: ignore[operator]
    assert over == 0  # 400 scores at <= 0.1 %: seeded, so this cannot flake


def test_scores_start_at_100_samples() -> None:
    ref = reference_stats(np.random.default_rng(1).normal(size=(500, 3)))
    mon = DriftMonitor(ref, window=500)
    mon.observe(np.zeros((99, 3)))
    assert mon.scores()["input_psi"] is None
    mon.observe(np.zeros((1, 3)))
    assert mon.scores()["input_psi"] is not None
    assert DriftMonitor(ref, window=20).min_samples == 20  # a short window scores when full
