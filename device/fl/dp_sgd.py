"""Sample-level DP-SGD for the NumPy MLP: Poisson batches, per-example clipping, noise.

What one run of these steps costs is :class:`~edgefleet.device.privacy.accounting.DpEvent`
(see that module for the accounting); the device's ledger composes it across rounds.

Per-example gradients are never materialized (``b × fan_in × fan_out`` per layer): for a
dense layer, example ``i``'s weight gradient is the outer product ``a_i d_iᵀ`` of its
input and its loss gradient at the layer's output, so its squared norm is
``‖a_i‖²·‖d_i‖²`` (plus ``‖d_i‖²`` for the bias), and the sum of the clipped gradients is
one matmul ``Aᵀ diag(c) D`` ("ghost clipping", Goodfellow 2015, Li et al. 2021). The clip
factor ``c_i`` uses each example's norm over all layers jointly: the released quantity is
exactly the one per-example clipping defines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.privacy.accounting import DpEvent

__all__ = ["DpSgdConfig", "TrainableModel", "add_noise", "clipped_sum", "grad_norms",
           "poisson_batch", "private_gradient", "train_dp_sgd"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
Arr = npt.NDArray[np.floating]
Params = list[Arr]


class TrainableModel(Protocol):
    """What DP-SGD needs of a model of dense layers (``edgefleet.device.runtime.mlp.MLP``).

    ``params`` is ``[W1, b1, W2, b2, ...]`` with ``W`` shaped ``(fan_in, fan_out)``.
    """

    params: Params

    def dense_terms(self, x: npt.NDArray[np.floating],
                    y: npt.NDArray[np.integer]) -> tuple[list[Arr], list[Arr]]:
        """Per layer: each example's input ``(b, fan_in)`` and the gradient of its own loss
        with respect to the layer's output ``(b, fan_out)``."""
        ...


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


def _row_sq(m: Arr) -> F64:
    """Squared L2 norm of each row, accumulated in float64 (cheap: b × width)."""
    m64 = m.astype(np.float64)
    out: F64 = np.einsum("ij,ij->i", m64, m64)
    return out


def grad_norms(inputs: Sequence[Arr], out_grads: Sequence[Arr]) -> F64:
    """Each example's whole-gradient L2 norm over all dense layers (weights and biases)."""
    if len(inputs) != len(out_grads) or not inputs:
        raise UsageError("need one input and one output gradient per dense layer")
    sq = sum((_row_sq(a) * _row_sq(d) + _row_sq(d)
              for a, d in zip(inputs, out_grads, strict=True)), np.zeros(len(inputs[0])))
    out: F64 = np.sqrt(sq)
    return out


def clipped_sum(inputs: Sequence[Arr], out_grads: Sequence[Arr], clip: float) -> Params:
    """Sum over examples of each one's gradient clipped to L2 ``clip``, ``[W1, b1, ...]``.

    Each example is scaled by ``min(1, clip / ‖g_i‖)`` with ``‖g_i‖`` its norm over all
    layers (:func:`grad_norms`); a zero gradient stays zero.
    """
    if clip <= 0:
        raise UsageError(f"clipping norm must be positive, got {clip}")
    scale = np.minimum(1.0, clip / np.maximum(grad_norms(inputs, out_grads), 1e-12))
    out: Params = []
    for a, d in zip(inputs, out_grads, strict=True):
        ds = d * scale.astype(d.dtype)[:, None]
        out += [a.T @ ds, ds.sum(axis=0)]
    return out


def add_noise(summed: Params, clip: float, sigma: float, expected_batch: float,
              rng: np.random.Generator) -> Params:
    """``(sum + N(0, (σ·C)²) per coordinate) / (q·n)``, in each parameter's dtype.

    The noise is drawn in float64 once per step, also for an empty Poisson batch (which
    releases pure noise, as the accountant assumes).
    """
    if clip <= 0:
        raise UsageError(f"clipping norm must be positive, got {clip}")
    out: Params = []
    for s in summed:
        noisy = rng.normal(0.0, sigma * clip, size=s.shape)
        noisy += s
        noisy /= expected_batch
        out.append(noisy.astype(s.dtype))
    return out


def private_gradient(model: TrainableModel, x: npt.NDArray[np.floating],
                     y: npt.NDArray[np.integer], clip: float, sigma: float,
                     expected_batch: float, rng: np.random.Generator) -> Params:
    """One step's released gradient on the batch ``(x, y)`` (clipped sum, noise, ``/q·n``)."""
    if len(y):
        summed = clipped_sum(*model.dense_terms(x, y), clip)
    else:
        summed = [np.zeros(p.shape, dtype=p.dtype) for p in model.params]
    return add_noise(summed, clip, sigma, expected_batch, rng)


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
        grads = private_gradient(model, x[idx], y[idx], cfg.clip, cfg.sigma, expected, rng)
        for i, (p, g, v) in enumerate(zip(model.params, grads, velocity, strict=True)):
            if weight_decay and p.ndim == 2:
                g = g + weight_decay * p
            if mu and anchor is not None:
                g = g + mu * (p - anchor[i])
            v *= cfg.momentum
            v -= cfg.lr * g
            p += v
    return cfg.event
