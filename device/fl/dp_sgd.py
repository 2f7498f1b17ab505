"""Sample-level DP-SGD for the NumPy MLP: Poisson batches, per-example clipping, noise.

What one run of these steps costs is :class:`~edgefleet.device.privacy.accounting.DpEvent`
(see that module for the accounting); the device's ledger composes it across rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.privacy.accounting import DpEvent

__all__ = ["DpSgdConfig", "TrainableModel", "clip_and_noise", "poisson_batch", "train_dp_sgd"]

F32 = npt.NDArray[np.float32]
Params = list[npt.NDArray[np.floating]]


class TrainableModel(Protocol):
    """What DP-SGD needs of a model (``edgefleet.device.runtime.mlp.MLP`` is one)."""

    params: Params

    def per_example_grads(self, x: npt.NDArray[np.floating],
                          y: npt.NDArray[np.integer]) -> Params: ...


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
