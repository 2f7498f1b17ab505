"""A small multi-layer perceptron written in NumPy.

Forward pass, loss and per-example gradient terms are plain NumPy so that the same code
trains on an ARM device without TensorFlow (federated learning, DP-SGD) and exports
to ONNX and TFLite bit-for-bit from the same weights. Parameters are a flat list
``[W1, b1, W2, b2, ...]`` (``W`` is ``(fan_in, fan_out)``), which is also the shape of
the arrays Flower exchanges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["MLP", "PARAMS_FILE", "Params", "load_params", "softmax", "write_params"]

#: The fp32 weights in a model package (the starting point for FL and distillation).
PARAMS_FILE = "params.npz"

F32 = npt.NDArray[np.float32]
#: ``[W1, b1, W2, b2, ...]``; float32 normally, float64 allowed (gradient checks).
Arr = npt.NDArray[np.floating]
Params = list[Arr]


def softmax(logits: npt.NDArray[np.floating], temperature: float = 1.0) -> F32:
    """Row-wise softmax of ``logits / temperature``, numerically stable."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: F32 = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


def _xent(logits: npt.NDArray[np.floating], y: npt.NDArray[np.integer]) -> float:
    """Mean cross-entropy from logits, via a float64 log-softmax."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), y]))


@dataclass
class MLP:
    """ReLU MLP with layer sizes ``sizes = (n_in, hidden..., n_out)``.

    Computation keeps the parameters' dtype (float32 normally; float64 in gradient checks).
    """

    sizes: tuple[int, ...]
    params: Params

    @classmethod
    def init(cls, sizes: Sequence[int], seed: int = 0) -> MLP:
        """He-initialized weights, zero biases; deterministic in ``seed``."""
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(f"bad layer sizes {tuple(sizes)}")
        rng = np.random.default_rng(seed)
        params: Params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
            params += [w.astype(np.float32), np.zeros(fan_out, dtype=np.float32)]
        return cls(tuple(int(s) for s in sizes), params)

    @classmethod
    def from_params(cls, params: Sequence[npt.NDArray[np.floating]]) -> MLP:
        """Rebuild from ``[W1, b1, ...]``, checking that the shapes chain."""
        if len(params) < 2 or len(params) % 2:
            raise ValueError("params must be [W1, b1, W2, b2, ...]")
        arrs = [np.asarray(p, dtype=np.float32) for p in params]
        sizes = [arrs[0].shape[0]]
        for w, b in zip(arrs[::2], arrs[1::2], strict=True):
            if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[0] != sizes[-1]:
                raise ValueError(f"inconsistent shapes {w.shape} / {b.shape}")
            sizes.append(w.shape[1])
        return cls(tuple(sizes), arrs)

    @property
    def n_layers(self) -> int:
        """Number of affine layers."""
        return len(self.params) // 2

    def copy(self) -> MLP:
        """A deep copy (training mutates ``params`` in place)."""
        return MLP(self.sizes, [p.copy() for p in self.params])

    def _activations(self, x: Arr) -> tuple[list[Arr], Arr]:
        acts = [x]
        a = x
        for i in range(self.n_layers):
            z = a @ self.params[2 * i] + self.params[2 * i + 1]
            if i == self.n_layers - 1:
                return acts, z
            a = np.maximum(z, 0.0)
            acts.append(a)
        raise AssertionError("unreachable")

    def forward(self, x: npt.NDArray[np.floating]) -> Arr:
        """Logits for a batch ``(n, n_in)`` of normalized inputs."""
        return self._activations(np.asarray(x, dtype=self.params[0].dtype))[1]

    def loss(self, x: npt.NDArray[np.floating], y: npt.NDArray[np.integer]) -> float:
        """Mean softmax cross-entropy."""
        return _xent(self.forward(x), y)

    def _deltas(self, x: Arr, y: npt.NDArray[np.integer]) -> tuple[list[Arr], list[Arr], float]:
        """Per-example output errors for each layer, back to front, and the mean loss."""
        acts, logits = self._activations(x)
        n = len(y)
        loss = _xent(logits, y)
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        delta = e / e.sum(axis=1, keepdims=True)
        delta[np.arange(n), y] -= 1.0
        deltas = [delta]
        for i in range(self.n_layers - 1, 0, -1):
            delta = (delta @ self.params[2 * i].T) * (acts[i] > 0)
            deltas.append(delta)
        deltas.reverse()
        return acts, deltas, loss

    def loss_and_grad(
        self, x: npt.NDArray[np.floating], y: npt.NDArray[np.integer]
    ) -> tuple[float, Params]:
        """Mean loss and its gradient with respect to every parameter."""
        acts, deltas, loss = self._deltas(np.asarray(x, dtype=self.params[0].dtype), y)
        n = len(y)
        grads: Params = []
        for a, d in zip(acts, deltas, strict=True):
            grads += [a.T @ d / n, d.sum(axis=0) / n]
        return loss, grads

    def grad_from_logits(
        self, x: npt.NDArray[np.floating],
        dlogits: Callable[[Arr], tuple[float, Arr]],
    ) -> tuple[float, Params]:
        """Backpropagate any loss of the logits: ``dlogits(logits)`` gives (loss, dL/dlogits).

        For losses other than cross-entropy on hard labels (distillation); the gradient
        returned for the logits must already include the batch mean's ``1/n``.
        """
        acts, logits = self._activations(np.asarray(x, dtype=self.params[0].dtype))
        loss, delta = dlogits(logits)
        delta = np.asarray(delta, dtype=logits.dtype)
        deltas = [delta]
        for i in range(self.n_layers - 1, 0, -1):
            delta = (delta @ self.params[2 * i].T) * (acts[i] > 0)
            deltas.append(delta)
        deltas.reverse()
        grads: Params = []
        for a, d in zip(acts, deltas, strict=True):
            grads += [a.T @ d, d.sum(axis=0)]
        return loss, grads

    def dense_terms(
        self, x: npt.NDArray[np.floating], y: npt.NDArray[np.integer]
    ) -> tuple[list[Arr], list[Arr]]:
        """Per layer, each example's input ``a_i`` and the gradient ``d_i`` of its own loss
        with respect to the layer's output: example ``i``'s gradient is ``outer(a_i, d_i)``
        for ``W`` and ``d_i`` for ``b``. DP-SGD clips from these without materializing the
        per-example gradients (:mod:`edgefleet.device.fl.dp_sgd`).
        """
        acts, deltas, _ = self._deltas(np.asarray(x, dtype=self.params[0].dtype), y)
        return acts, deltas

    def predict(self, x: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
        """Arg-max class per row."""
        out: npt.NDArray[np.int64] = np.argmax(self.forward(x), axis=1).astype(np.int64)
        return out

    def accuracy(self, x: npt.NDArray[np.floating], y: npt.NDArray[np.integer]) -> float:
        """Share of rows whose arg-max equals the label."""
        return float(np.mean(self.predict(x) == y)) if len(y) else 0.0


def write_params(path: Path, params: Sequence[np.ndarray]) -> None:
    """Save fp32 weights ``[W1, b1, ...]`` (the starting point for FL and distillation)."""
    np.savez(path, *params)


def load_params(path: Path) -> list[np.ndarray]:
    """Inverse of :func:`write_params`."""
    with np.load(path, allow_pickle=False) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]
