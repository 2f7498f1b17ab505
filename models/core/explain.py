"""Per-feature attributions for one prediction: integrated gradients on the NumPy MLP.

Integrated gradients (Sundararajan et al., 2017) attribute ``logit_c(x) - logit_c(x0)``
to the input features along the straight path from a baseline ``x0`` to ``x``. It is
*complete*: the attributions sum to that logit difference, which the tests check. For a
ReLU network the path integral is of a piecewise-constant gradient, so a trapezoid rule
with a few dozen steps is already close. The baseline defaults to the training mean
(zero after normalization): "an average input".

Attributions are computed on the package's fp32 weights (``params.npz``); the int8
variants approximate the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import PackageError
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import Manifest, load_package
from edgefleet.device.runtime.mlp import MLP, PARAMS_FILE, load_params

__all__ = ["Explanation", "explain", "explain_package", "input_gradient"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Explanation:
    """Attributions (raw-feature space) for class ``target`` of one sample."""

    target: int
    attributions: F64
    logit: float
    baseline_logit: float

    @property
    def completeness_gap(self) -> float:
        """``|sum(attributions) - (logit - baseline_logit)|``: 0 for exact integration."""
        return abs(float(self.attributions.sum()) - (self.logit - self.baseline_logit))


def input_gradient(model: MLP, x: npt.NDArray[np.floating], target: int) -> F64:
    """d logit[target] / d x for each row of ``x`` (normalized inputs), shape ``x.shape``."""
    a = np.asarray(x, dtype=np.float64)
    params = [np.asarray(p, dtype=np.float64) for p in model.params]
    masks = []
    for i in range(model.n_layers - 1):
        z = a @ params[2 * i] + params[2 * i + 1]
        masks.append(z > 0)
        a = np.maximum(z, 0.0)
    g = np.broadcast_to(params[-2][:, target], (len(a), params[-2].shape[0])).copy()
    for i in range(model.n_layers - 2, -1, -1):
        g = (g * masks[i]) @ params[2 * i].T
    return g


def explain(model: MLP, x_norm: npt.NDArray[np.floating], target: int | None = None,
            baseline: npt.NDArray[np.floating] | None = None, steps: int = 64) -> Explanation:
    """Integrated gradients for one normalized sample ``x_norm`` (shape ``(n_features,)``)."""
    x = np.asarray(x_norm, dtype=np.float64).reshape(-1)
    x0 = np.zeros_like(x) if baseline is None else np.asarray(baseline, np.float64).reshape(-1)
    m64 = MLP(model.sizes, [np.asarray(p, dtype=np.float64) for p in model.params])
    logits = m64.forward(x[None, :])[0]
    cls = int(np.argmax(logits)) if target is None else target
    alphas = np.linspace(0.0, 1.0, steps + 1)
    path = x0[None, :] + alphas[:, None] * (x - x0)[None, :]
    grads = input_gradient(m64, path, cls)
    avg = (grads[:-1] + grads[1:]).sum(axis=0) / (2 * steps)  # trapezoid rule
    attributions = (x - x0) * avg
    return Explanation(cls, attributions, float(logits[cls]),
                       float(m64.forward(x0[None, :])[0][cls]))


def load_model(root: Path) -> MLP:
    """The package's fp32 NumPy model (``params.npz``)."""
    path = root / PARAMS_FILE
    if not path.exists():
        raise PackageError(f"{PARAMS_FILE} is missing: explanations need the fp32 weights",
                           path=str(root))
    return MLP.from_params(load_params(path))


def explain_package(root: Path | str, x_raw: npt.NDArray[np.floating],
                    target: int | None = None, steps: int = 64) -> tuple[Manifest, Explanation]:
    """Verify the package, then explain one raw sample (normalized as the device would)."""
    root = Path(root)
    manifest = load_package(root)
    x = normalize(np.asarray(x_raw, dtype=np.float32).reshape(1, -1), manifest.normalization)
    return manifest, explain(load_model(root), x[0], target, steps=steps)
