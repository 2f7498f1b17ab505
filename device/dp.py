"""Sample-level DP-SGD for the NumPy MLP, and its privacy accounting.

Mechanism (Abadi et al. 2016, as in Opacus/TF-Privacy): every step draws a batch by
**Poisson sampling** (each local example joins independently with probability ``q``),
clips each example's gradient to L2 norm ``C``, sums, adds ``N(0, (σ·C)²)`` to every
coordinate and divides by the *expected* batch size ``q·n`` (a data-independent
denominator, so the sensitivity of the released mean is exactly ``C / (q·n)``).

Accounting matches that sampling: ``steps`` self-composed
``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` under the add/remove-one neighbouring
relation, evaluated with dp-accounting's RDP accountant. The same event is what the
privacy ledger composes across rounds and runs, so nothing is accounted twice or missed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.device.errors import UsageError

__all__ = [
    "DpEvent",
    "DpSgdConfig",
    "TrainableModel",
    "clip_and_noise",
    "epsilon_for",
    "noise_for_epsilon",
    "poisson_batch",
    "train_dp_sgd",
]

F32 = npt.NDArray[np.float32]
Params = list[npt.NDArray[np.floating]]


class TrainableModel(Protocol):
    """What DP-SGD needs of a model (``edgefleet.models.mlp.MLP`` is one)."""

    params: Params

    def per_example_grads(self, x: npt.NDArray[np.floating],
                          y: npt.NDArray[np.integer]) -> Params: ...


@dataclass(frozen=True)
class DpEvent:
    """``steps`` Poisson-sampled Gaussian steps at rate ``q`` and noise multiplier ``sigma``."""

    q: float
    sigma: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise UsageError(f"sampling rate q must be in (0, 1], got {self.q}")
        if not (self.sigma > 0.0 and math.isfinite(self.sigma)):
            raise UsageError(f"noise multiplier must be positive, got {self.sigma}")
        if self.steps < 0:
            raise UsageError(f"steps must be >= 0, got {self.steps}")

    def to_accounting(self) -> Any:
        """The dp-accounting event this mechanism is (import kept local: optional extra)."""
        import dp_accounting as dpa

        return dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(self.q, dpa.GaussianDpEvent(self.sigma)), self.steps)


def epsilon_for(events: Sequence[DpEvent], delta: float) -> float:
    """ε at ``delta`` of all ``events`` composed, from the RDP accountant.

    Events with the same ``(q, sigma)`` are merged into one with their steps summed
    first: RDP composes additively, so the result is the same, and a ledger that grows
    by one round at a time costs one accountant evaluation per distinct mechanism.
    """
    merged: dict[tuple[float, float], int] = {}
    for ev in events:
        merged[(ev.q, ev.sigma)] = merged.get((ev.q, ev.sigma), 0) + ev.steps
    return _epsilon_cached(tuple(DpEvent(q, s, n) for (q, s), n in sorted(merged.items())),
                           delta)


@lru_cache(maxsize=4096)
def _epsilon_cached(events: tuple[DpEvent, ...], delta: float) -> float:
    from dp_accounting import rdp

    if not 0.0 < delta < 1.0:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    acc = rdp.RdpAccountant()
    for ev in events:
        if ev.steps:
            acc.compose(ev.to_accounting())
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=1024)
def noise_for_epsilon(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    """Smallest σ whose ``steps`` Poisson steps at rate ``q`` stay within ``target_epsilon``.

    Rounded up to 4 decimals so the ε actually spent never exceeds the target.
    """
    import dp_accounting as dpa
    from dp_accounting import rdp

    if target_epsilon <= 0:
        raise UsageError(f"--epsilon must be positive, got {target_epsilon}")
    sigma = float(dpa.calibrate_dp_mechanism(
        rdp.RdpAccountant,
        lambda s: DpEvent(q, float(s), steps).to_accounting(),
        target_epsilon, delta,
        bracket_interval=dpa.ExplicitBracketInterval(0.05, 500.0),
        tol=1e-5,
    ))
    sigma = math.ceil(sigma * 1e4) / 1e4
    while epsilon_for([DpEvent(q, sigma, steps)], delta) > target_epsilon:
        sigma += 1e-4
    return sigma


@dataclass(frozen=True)
class DpSgdConfig:
    """One device's local DP-SGD settings for one round."""

    clip: float = 1.0
    sigma: float = 1.0
    q: float = 0.1
    steps: int = 10
    lr: float = 0.1
    momentum: float = 0.0

    @property
    def event(self) -> DpEvent:
        """What these steps cost in privacy."""
        return DpEvent(self.q, self.sigma, self.steps)


def poisson_batch(rng: np.random.Generator, n: int, q: float) -> npt.NDArray[np.intp]:
    """Indices of a Poisson sample: each of ``n`` rows joins with probability ``q``."""
    return np.flatnonzero(rng.random(n) < q)


def clip_and_noise(per_example: Params, clip: float, sigma: float, expected_batch: float,
                   rng: np.random.Generator) -> Params:
    """Clip each example's whole gradient to L2 ``clip``, sum, add noise, divide by ``q·n``.

    ``per_example`` holds arrays shaped ``(b, *param.shape)`` (b may be 0: an empty
    Poisson batch still releases pure noise, as the accountant assumes).
    """
    if clip <= 0:
        raise UsageError(f"clipping norm must be positive, got {clip}")
    b = per_example[0].shape[0]
    if b:
        sq = sum(np.sum(g.reshape(b, -1).astype(np.float64) ** 2, axis=1) for g in per_example)
        scale = np.minimum(1.0, clip / np.maximum(np.sqrt(sq), 1e-12))
    out: Params = []
    for g in per_example:
        total = (np.tensordot(scale, g, axes=(0, 0)) if b
                 else np.zeros(g.shape[1:], dtype=np.float64))
        noisy = total + rng.normal(0.0, sigma * clip, size=total.shape)
        out.append((noisy / expected_batch).astype(g.dtype))
    return out


def train_dp_sgd(model: TrainableModel, x: F32, y: npt.NDArray[np.integer], cfg: DpSgdConfig,
                 rng: np.random.Generator, weight_decay: float = 0.0,
                 anchor: Params | None = None, mu: float = 0.0) -> DpEvent:
    """Run ``cfg.steps`` DP-SGD steps on ``model`` in place; returns the event to account.

    Weight decay, momentum and FedProx's proximal pull ``mu·(w - anchor)`` act on
    already-privatized gradients and on no data (post-processing: no extra ε).
    """
    n = len(y)
    if n == 0:
        raise UsageError("no local training data")
    expected = cfg.q * n
    velocity = [np.zeros_like(p) for p in model.params]
    for _ in range(cfg.steps):
        idx = poisson_batch(rng, n, cfg.q)
        if len(idx):
            per_ex = model.per_example_grads(x[idx], y[idx])
        else:
            per_ex = [np.zeros((0, *p.shape), dtype=p.dtype) for p in model.params]
        grads = clip_and_noise(per_ex, cfg.clip, cfg.sigma, expected, rng)
        for i, (p, g, v) in enumerate(zip(model.params, grads, velocity, strict=True)):
            if weight_decay and p.ndim == 2:
                g = g + weight_decay * p
            if mu and anchor is not None:
                g = g + mu * (p - anchor[i])
            v *= cfg.momentum
            v -= cfg.lr * g
            p += v
    return cfg.event
