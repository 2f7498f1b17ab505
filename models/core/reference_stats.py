"""Reference histograms of the training inputs and confidences, stored in the package.

Devices measure drift (PSI, :mod:`edgefleet.device.inference.drift`) against these. Bin edges are
deciles of the training data (equal-mass bins make PSI sensitive where the data is);
features with fewer distinct values get fewer bins, a constant feature gets one.

The confidences must be the packaged model's on data it was not fitted to (the caller's
job: :func:`edgefleet.models.build.pipeline.package_model` uses the test split). They are
binned at float32 precision, the device's: a sharp model answers many samples with a
confidence that is exactly 1.0 in float32 but not in float64, and a bin edge at 1.0 then
means something else on each side. Each histogram records how many samples it was
measured on, which sets how much PSI its own sampling noise adds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.inference.drift import histogram_probs, pool_groups, pool_rows

__all__ = ["quantile_edges", "reference_stats"]

N_BINS = 10


def quantile_edges(values: npt.ArrayLike, bins: int = N_BINS) -> list[float]:
    """Distinct inner cut points at the ``1/bins .. (bins-1)/bins`` quantiles."""
    v = np.asarray(values, dtype=np.float64)
    qs = np.quantile(v, np.linspace(0, 1, bins + 1)[1:-1])
    edges = sorted({round(float(q), 6) for q in qs})
    # A cut at the minimum leaves its left bin empty; drop it.
    return [e for e in edges if e > float(v.min())]


def reference_stats(x_train: npt.ArrayLike, confidences: npt.ArrayLike | None = None,
                    bins: int = N_BINS, max_features: int | None = None) -> dict[str, Any]:
    """``{"features": {"edges", "probs"}, "confidence": {...}}`` for the manifest.

    ``x_train`` holds raw rows ``(n, features)`` as the device sees them. With
    ``max_features`` and wider rows (an imported image model: thousands of pixels, whose
    histograms would outgrow the manifest and the device's drift window), the features
    are the means of at most that many equal runs of values, recorded as ``pool``.
    """
    x = np.asarray(x_train, dtype=np.float64)
    x = x.reshape(len(x), -1)
    pool: dict[str, int] | None = None
    if max_features is not None and x.shape[1] > max_features:
        g = pool_groups(x.shape[1], max_features)
        pool = {"groups": g, "size": x.shape[1] // g}
        x = pool_rows(x, pool).astype(np.float64)
    edges = [quantile_edges(x[:, j], bins) for j in range(x.shape[1])]
    probs = [[round(float(p), 6) for p in histogram_probs(x[:, j], e)]
             for j, e in enumerate(edges)]
    out: dict[str, Any] = {"version": 1, "samples": int(x.shape[0]), "bins": bins,
                           "features": {"edges": edges, "probs": probs}}
    if pool is not None:
        out["pool"] = pool
    if confidences is not None:
        c = np.asarray(confidences, dtype=np.float32).astype(np.float64)
        ce = quantile_edges(c, bins)
        out["confidence"] = {"edges": ce, "samples": int(c.shape[0]),
                             "probs": [round(float(p), 6) for p in histogram_probs(c, ce)]}
    return out
