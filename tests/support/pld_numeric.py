"""An independent numerical ε for Poisson-subsampled Gaussian DP-SGD (tests and benchmarks).

Written from the definitions, sharing no code with dp-accounting: for each neighbouring
direction under add/remove-one (remove: P = (1-q)·N(0,σ²) + q·N(1,σ²) against
Q = N(0,σ²); add: the reverse), the per-step privacy loss L(x) = log P(x)/Q(x) with
x ~ P is tabulated on a fine grid of x (probability masses from the normal CDF), its
values rounded to the *nearest* multiple of ``h`` (an estimate, neither bound), the
``steps``-fold composition is one FFT power, and
δ(ε) = Σ P(L)·(1 - e^{ε-L})₊ (the hockey-stick divergence). ε is the smallest value
whose δ in both directions is at most the target, found by bisection.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr, ndtr

__all__ = ["numeric_epsilon"]


def _loss_pmf(q: float, sigma: float, remove: bool, h: float) -> tuple[int, np.ndarray, float]:
    """(offset, pmf over L = (offset + i)·h, mass dropped as +∞ loss) of one step."""
    lo, hi = -11.0 * sigma, 1.0 + 11.0 * sigma
    edges = np.linspace(lo, hi, 400_001)
    mid = 0.5 * (edges[1:] + edges[:-1])
    z = (2.0 * mid - 1.0) / (2.0 * sigma * sigma)
    log_mix = np.logaddexp(math.log1p(-q), math.log(q) + z) if q < 1 else z
    if remove:  # x ~ P = mixture, L = log(mixture / N(0))
        c0 = np.diff(ndtr(edges / sigma))
        c1 = np.diff(ndtr((edges - 1.0) / sigma))
        mass = (1.0 - q) * c0 + q * c1
        loss = log_mix
        tail = (1 - q) * (math.exp(log_ndtr(lo / sigma)) + math.exp(log_ndtr(-hi / sigma))) \
            + q * (math.exp(log_ndtr((lo - 1) / sigma)) + math.exp(log_ndtr(-(hi - 1) / sigma)))
    else:  # x ~ N(0), L = log(N(0) / mixture)
        mass = np.diff(ndtr(edges / sigma))
        loss = -log_mix
        tail = math.exp(log_ndtr(lo / sigma)) + math.exp(log_ndtr(-hi / sigma))
    idx = np.rint(loss / h).astype(np.int64)
    off = int(idx.min())
    pmf = np.bincount(idx - off, weights=mass)
    return off, pmf, tail


def _delta(eps: float, off: int, pmf: np.ndarray, inf_mass: float, h: float) -> float:
    loss = (off + np.arange(len(pmf))) * h
    keep = loss > eps
    return float(np.sum(pmf[keep] * -np.expm1(eps - loss[keep]))) + inf_mass


def _composed(q: float, sigma: float, steps: int, remove: bool,
              h: float) -> tuple[int, np.ndarray, float]:
    off, pmf, tail = _loss_pmf(q, sigma, remove, h)
    n = steps * (len(pmf) - 1) + 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(pmf, size) ** steps, size)[:n]
    out = np.clip(out, 0.0, None)
    return off * steps, out, 1.0 - (1.0 - tail) ** steps


def numeric_epsilon(q: float, sigma: float, steps: int, delta: float, h: float = 2e-3) -> float:
    """ε at ``delta`` of ``steps`` Poisson(q)-subsampled Gaussian(σ) steps (an estimate)."""
    dirs = [_composed(q, sigma, steps, remove, h) for remove in (True, False)]

    def worst(eps: float) -> float:
        return max(_delta(eps, off, pmf, inf, h) for off, pmf, inf in dirs)

    lo, hi = 0.0, 1.0
    while worst(hi) > delta:
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    if worst(0.0) <= delta:
        return 0.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if worst(mid) <= delta else (mid, hi)
    return hi
