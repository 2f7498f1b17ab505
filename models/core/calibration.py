"""Temperature scaling and expected calibration error.

One scalar temperature ``T`` divides the logits; it is fit on a held-out calibration
split by minimizing negative log-likelihood, which leaves the arg-max (accuracy)
unchanged and makes the confidence mean what it says. The search is a golden-section
search in log T, in NumPy, so it needs no SciPy.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from edgefleet.device.runtime.mlp import softmax

__all__ = ["expected_calibration_error", "fit_temperature", "nll"]


def nll(logits: npt.NDArray[np.floating], y: npt.NDArray[np.integer], temperature: float) -> float:
    """Mean negative log-likelihood of the labels at ``temperature``."""
    p = softmax(logits, temperature).astype(np.float64)
    return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))


def fit_temperature(
    logits: npt.NDArray[np.floating],
    y: npt.NDArray[np.integer],
    lo: float = 0.05,
    hi: float = 20.0,
    iters: int = 60,
) -> float:
    """The temperature in ``[lo, hi]`` that minimizes NLL (NLL is unimodal in log T)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(logits, y, math.exp(c)), nll(logits, y, math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(logits, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(logits, y, math.exp(d))
    return math.exp((a + b) / 2)


def expected_calibration_error(
    probs: npt.NDArray[np.floating], y: npt.NDArray[np.integer], bins: int = 15
) -> float:
    """ECE with equal-width confidence bins: Σ (n_b / n) · |accuracy_b − confidence_b|."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)
