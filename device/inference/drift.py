"""Input and confidence drift: population stability index (PSI) on a sliding window.

The model package carries reference histograms of its training inputs and of its
calibrated confidences on held-out data (``manifest.reference_stats``, built by
:func:`edgefleet.models.core.reference_stats.reference_stats`). The device keeps the last
``window`` raw inputs and confidences and compares their histograms on the same bin
edges: PSI = Σ (a − e) · ln(a / e). Rule of thumb: < 0.1 stable, 0.1-0.25 moderate,
> 0.25 a real shift. Scores are computed when a report is built, not per inference.

A PSI measured on a finite window is biased upward even when nothing drifted: with ``B``
bins, a window of ``n`` and a reference of ``m`` samples, PSI / (1/n + 1/m) follows
roughly a χ² law with ``B − 1`` degrees of freedom. Each score therefore comes with its
``*_noise`` level, the PSI that sampling noise alone exceeds in at most one window of a
thousand (:func:`psi_noise`); the server's alert fires only above both its threshold and
that level, so a short window (just after start-up or a model swap) cannot raise one by
chance. PSI's tail is heavier than χ²'s on short windows (10 bins, 100 samples: the χ²
10⁻³ quantile is exceeded 0.3-0.45 % of the time, measured), so the level is the χ²
10⁻⁴ quantile, which measured at most 0.11 % from 100 samples up.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DriftMonitor", "chi2_quantile", "histogram_probs", "pool_groups", "pool_rows", "psi",
           "psi_noise"]

#: Floor for empty bins so ln(a/e) stays finite.
EPS = 1e-4
#: Standard normal quantile of the χ² quantile taken (1 − 10⁻⁴): no more than one
#: no-drift window in 1,000 exceeds the noise level (see the module docstring).
NOISE_Z = 3.719016
#: Fewest samples scored: ten per bin of a ten-bin histogram, so an empty bin (whose
#: ``EPS`` floor alone adds ~0.7 to the PSI) is a one-in-40,000 event, not one in 20.
MIN_SAMPLES = 100


def histogram_probs(values: npt.ArrayLike, edges: list[float]) -> npt.NDArray[np.float64]:
    """Share of ``values`` in each bin defined by the inner cut points ``edges``."""
    v = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right"),
                         minlength=len(edges) + 1).astype(np.float64)
    probs: npt.NDArray[np.float64] = counts / max(counts.sum(), 1.0)
    return probs


def pool_groups(n_features: int, limit: int) -> int:
    """The most groups, at most ``limit``, that split ``n_features`` into equal runs."""
    return max(g for g in range(1, min(n_features, limit) + 1) if n_features % g == 0)


def pool_rows(x: npt.ArrayLike, pool: dict[str, int] | None) -> npt.NDArray[np.float32]:
    """Raw input rows as the reference's features: as they are, or (``pool``: an image's
    thousands of pixels) the means of ``groups`` equal runs of ``size`` values each."""
    if not pool:
        return np.asarray(x, dtype=np.float32)
    g, k = int(pool["groups"]), int(pool["size"])
    rows = np.asarray(x, dtype=np.float32).reshape(-1, g, k)
    pooled: npt.NDArray[np.float32] = rows.mean(axis=2, dtype=np.float32)
    return pooled


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Population stability index between two probability vectors over the same bins."""
    e = np.clip(np.asarray(expected, dtype=np.float64), EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def chi2_quantile(df: int, z: float = NOISE_Z) -> float:
    """χ² quantile by Wilson-Hilferty: at z = 3.72 it is 0.1-7.2 % above the exact one for
    every df >= 1 (so slightly conservative); the device has no SciPy."""
    if df <= 0:
        return 0.0
    k = 2.0 / (9.0 * df)
    return float(df * max(1.0 - k + z * math.sqrt(k), 0.0) ** 3)


def psi_noise(bins: int, window: int, reference_samples: int | None = None) -> float:
    """The PSI that a no-drift window of ``window`` samples exceeds at most once in 1,000.

    ``reference_samples`` is how many samples the reference histogram was measured on
    (its own noise adds to the window's); unknown counts as exact.
    """
    if bins <= 1 or window <= 0:
        return 0.0
    scale = 1.0 / window + (1.0 / reference_samples if reference_samples else 0.0)
    return chi2_quantile(bins - 1) * scale


class DriftMonitor:
    """Keeps a ring of recent inputs and confidences; scores them against the reference."""

    def __init__(self, reference: dict[str, Any], window: int = 500,
                 min_samples: int = MIN_SAMPLES) -> None:
        feats = reference["features"]
        self.feature_edges: list[list[float]] = feats["edges"]
        self.feature_probs: list[list[float]] = feats["probs"]
        self.feature_samples: int | None = reference.get("samples")
        #: Imported models with large inputs: features are means of runs of raw values.
        self.pool: dict[str, int] | None = reference.get("pool")
        conf = reference.get("confidence") or {}
        self.conf_edges: list[float] | None = conf.get("edges")
        self.conf_probs: list[float] | None = conf.get("probs")
        self.conf_samples: int | None = conf.get("samples")
        self.window = window
        self.min_samples = min(min_samples, window)
        n = len(self.feature_edges)
        self._x = np.zeros((window, n), dtype=np.float32)
        # float32 like the reference (reference_stats bins confidences at this precision):
        # near 1.0 the answer to "is it exactly 1?" depends on it.
        self._c = np.zeros(window, dtype=np.float32)
        self._nx = 0
        self._nc = 0
        self._lock = threading.Lock()

    @classmethod
    def from_manifest(cls, manifest: Any, window: int = 500) -> DriftMonitor | None:
        """A monitor for a package, or None when it has no reference statistics."""
        ref = getattr(manifest, "reference_stats", None)
        return cls(ref, window) if ref else None

    def observe(self, x: npt.ArrayLike, confidence: float | npt.ArrayLike | None = None) -> None:
        """Add one raw input row (or a batch) and its calibrated confidence(s)."""
        rows = pool_rows(x, self.pool).reshape(-1, self._x.shape[1])
        with self._lock:
            for row in rows:
                self._x[self._nx % self.window] = row
                self._nx += 1
            if confidence is not None:
                for c in np.atleast_1d(np.asarray(confidence, dtype=np.float32)):
                    self._c[self._nc % self.window] = c
                    self._nc += 1

    def scores(self) -> dict[str, float | int | None]:
        """``input_psi`` (mean over features), ``input_psi_max``, ``confidence_psi``, and
        ``input_psi_noise`` / ``confidence_psi_noise``: the levels sampling noise alone
        reaches at this window (:func:`psi_noise`; for the mean, the mean of the features'
        levels, which is conservative whatever the features' correlation)."""
        with self._lock:
            nx, nc = min(self._nx, self.window), min(self._nc, self.window)
            xs = self._x[:nx].copy()
            cs = self._c[:nc].copy()
        out: dict[str, float | int | None] = {
            "window": nx, "input_psi": None, "input_psi_max": None, "input_psi_noise": None,
            "confidence_psi": None, "confidence_psi_noise": None}
        if nx >= self.min_samples:
            per = [psi(p, histogram_probs(xs[:, j], e))
                   for j, (e, p) in enumerate(zip(self.feature_edges, self.feature_probs,
                                                  strict=True))]
            out["input_psi"] = round(float(np.mean(per)), 4)
            out["input_psi_max"] = round(float(np.max(per)), 4)
            out["input_psi_noise"] = round(float(np.mean(
                [psi_noise(len(e) + 1, nx, self.feature_samples)
                 for e in self.feature_edges])), 4)
        if nc >= self.min_samples and self.conf_edges is not None and self.conf_probs:
            out["confidence_psi"] = round(psi(self.conf_probs,
                                              histogram_probs(cs, self.conf_edges)), 4)
            out["confidence_psi_noise"] = round(
                psi_noise(len(self.conf_edges) + 1, nc, self.conf_samples), 4)
        return out
