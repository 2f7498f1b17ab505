"""Golden inputs: a package carries a few raw inputs with the logits each variant must give.

Running them after loading catches a model file that verifies by hash but was built
wrong, a runtime that computes differently on this CPU, and a mixed-up variant.
"""

from __future__ import annotations

import numpy as np

from edgefleet.device.core.errors import ModelRejected
from edgefleet.device.runtime.backends import InferenceBackend
from edgefleet.device.runtime.manifest import Manifest, Normalization

__all__ = ["check_golden", "normalize"]


def normalize(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """``(x - mean) / std`` in float32, as the model was trained."""
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


def check_golden(manifest: Manifest, variant: str, backend: InferenceBackend) -> float:
    """Run the golden inputs on ``backend``; raise :class:`ModelRejected` on a mismatch.

    Returns the largest absolute logit difference seen (for logs and tests).
    """
    samples = [g for g in manifest.golden if variant in g.logits]
    if not samples:
        return 0.0
    atol = manifest.golden_atol.get(variant, 1e-3)
    x = normalize(np.asarray([g.input for g in samples], dtype=np.float32), manifest.normalization)
    got = backend.run(x)
    want = np.asarray([g.logits[variant] for g in samples], dtype=np.float32)
    if got.shape != want.shape:
        raise ModelRejected(f"{variant}: golden output shape {got.shape} != {want.shape}")
    worst = float(np.max(np.abs(got - want)))
    if worst > atol or not np.array_equal(got.argmax(axis=1), want.argmax(axis=1)):
        raise ModelRejected(
            f"{variant}: golden inputs give different outputs (max diff {worst:.4g} > {atol:.4g})"
        )
    return worst
