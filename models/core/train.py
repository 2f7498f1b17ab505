"""Plain (non-private) training of the NumPy MLP, and input normalization.

Federated DP-SGD lives with the Flower client; this is the centralized trainer used by
``models build`` and as the baseline the benchmarks compare against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import Normalization
from edgefleet.device.runtime.mlp import MLP, Params

__all__ = ["LossAndGrad", "TrainConfig", "apply_normalization", "fit_normalization", "train_sgd"]

F32 = npt.NDArray[np.float32]
#: ``(model, batch row indices) -> (mean loss, gradients)``.
LossAndGrad = Callable[[MLP, npt.NDArray[np.intp]], tuple[float, Params]]


@dataclass(frozen=True)
class TrainConfig:
    """SGD with momentum; defaults fit the digits task in about a second."""

    epochs: int = 40
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0


def fit_normalization(x: npt.NDArray[np.floating], min_std: float = 1e-3) -> Normalization:
    """Per-feature mean and std of the training inputs; constant features get std 1."""
    mean = np.mean(x, axis=0)
    std = np.std(x, axis=0)
    std = np.where(std < min_std, 1.0, std)
    return Normalization(mean=[float(v) for v in mean], std=[float(v) for v in std])


def apply_normalization(x: npt.NDArray[np.floating], norm: Normalization) -> F32:
    """``(x - mean) / std`` in float32 (the device's own function, so both agree)."""
    return normalize(x, norm)


def train_sgd(
    model: MLP,
    x: F32,
    y: npt.NDArray[np.integer],
    cfg: TrainConfig = TrainConfig(),
    on_epoch: Callable[[int, float], None] | None = None,
    loss_and_grad: LossAndGrad | None = None,
) -> MLP:
    """Train ``model`` in place on normalized ``x``; returns it for chaining.

    ``loss_and_grad(model, idx)`` replaces cross-entropy on ``y[idx]`` (distillation uses
    it to mix in the teacher's soft targets of the same rows).
    """
    rng = np.random.default_rng(cfg.seed)
    velocity = [np.zeros_like(p) for p in model.params]
    n = len(y)
    for epoch in range(cfg.epochs):
        order = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss, grads = (model.loss_and_grad(x[idx], y[idx]) if loss_and_grad is None
                           else loss_and_grad(model, idx))
            total += loss * len(idx)
            for p, g, v in zip(model.params, grads, velocity, strict=True):
                if p.ndim == 2:
                    g = g + cfg.weight_decay * p
                v *= cfg.momentum
                v -= cfg.lr * g
                p += v
        if on_epoch is not None:
            on_epoch(epoch, total / n)
    return model
