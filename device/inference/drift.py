"""Input and confidence drift: population stability index (PSI) on a sliding window.

The model package carries reference histograms of its training inputs and of its
calibrated confidences (``manifest.reference_stats``, built by
:func:`edgefleet.models.core.reference_stats.reference_stats`). The device keeps the last
``window`` raw inputs and confidences and compares their histograms on the same bin
edges: PSI = Σ (a − e) · ln(a / e). Rule of thumb: < 0.1 stable, 0.1-0.25 moderate,
> 0.25 a real shift. Scores are computed when a report is built, not per inference.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["DriftMonitor", "histogram_probs", "psi"]

#: Floor for empty bins so ln(a/e) stays finite.
EPS = 1e-4


def histogram_probs(values: npt.ArrayLike, edges: list[float]) -> npt.NDArray[np.float64]:
    """Share of ``values`` in each bin defined by the inner cut points ``edges``."""
    v = np.asarray(values, dtype=np.float64)
    counts = np.bincount(np.searchsorted(np.asarray(edges, dtype=np.float64), v, side="right"),
                         minlength=len(edges) + 1).astype(np.float64)
    probs: npt.NDArray[np.float64] = counts / max(counts.sum(), 1.0)
    return probs


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Population stability index between two probability vectors over the same bins."""
    e = np.clip(np.asarray(expected, dtype=np.float64), EPS, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """Keeps a ring of recent inputs and confidences; scores them against the reference."""

    def __init__(self, reference: dict[str, Any], window: int = 500,
                 min_samples: int = 50) -> None:
        feats = reference["features"]
        self.feature_edges: list[list[float]] = feats["edges"]
        self.feature_probs: list[list[float]] = feats["probs"]
        conf = reference.get("confidence") or {}
        self.conf_edges: list[float] | None = conf.get("edges")
        self.conf_probs: list[float] | None = conf.get("probs")
        self.window = window
        self.min_samples = min_samples
        n = len(self.feature_edges)
        self._x = np.zeros((window, n), dtype=np.float32)
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
        rows = np.asarray(x, dtype=np.float32).reshape(-1, self._x.shape[1])
        with self._lock:
            for row in rows:
                self._x[self._nx % self.window] = row
                self._nx += 1
            if confidence is not None:
                for c in np.atleast_1d(np.asarray(confidence, dtype=np.float32)):
                    self._c[self._nc % self.window] = c
                    self._nc += 1

    def scores(self) -> dict[str, float | int | None]:
        """``input_psi`` (mean over features), ``input_psi_max``, ``confidence_psi``."""
        with self._lock:
            nx, nc = min(self._nx, self.window), min(self._nc, self.window)
            xs = self._x[:nx].copy()
            cs = self._c[:nc].copy()
        out: dict[str, float | int | None] = {"window": nx, "input_psi": None,
                                              "input_psi_max": None, "confidence_psi": None}
        if nx >= self.min_samples:
            per = [psi(p, histogram_probs(xs[:, j], e))
                   for j, (e, p) in enumerate(zip(self.feature_edges, self.feature_probs,
                                                  strict=True))]
            out["input_psi"] = round(float(np.mean(per)), 4)
            out["input_psi_max"] = round(float(np.max(per)), 4)
        if nc >= self.min_samples and self.conf_edges is not None and self.conf_probs:
            out["confidence_psi"] = round(psi(self.conf_probs,
                                              histogram_probs(cs, self.conf_edges)), 4)
        return out
