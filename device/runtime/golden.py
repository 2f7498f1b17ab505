"""Golden inputs: a package carries a few raw inputs with the logits each variant must give.

Running them after loading catches a model file that verifies by hash but was built
wrong, a runtime that computes wrongly on this CPU, and a mixed-up variant. int8
variants may carry a :class:`GoldenRule` whose tolerance is the variant's own
quantization error, because two correct int8 runtimes (x86-64, aarch64) round differently.
"""

from __future__ import annotations

import numpy as np

from edgefleet.device.core.errors import ModelRejected
from edgefleet.device.runtime.backends import InferenceBackend
from edgefleet.device.runtime.manifest import GoldenRule, Manifest, Normalization

__all__ = ["check_golden", "normalize"]


def normalize(x: np.ndarray, norm: Normalization) -> np.ndarray:
    """``(x - mean) / std`` in float32, as the model was trained."""
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32)


def check_golden(manifest: Manifest, variant: str, backend: InferenceBackend) -> float:
    """Run the golden inputs on ``backend``; raise :class:`ModelRejected` on a mismatch.

    With a :class:`GoldenRule` for ``variant`` (int8 variants of newer packages) the rule
    decides; without one every logit must be within ``golden_atol`` and every arg-max
    equal, as packages have always been checked. Returns the largest absolute logit
    difference seen (for logs and tests).
    """
    samples = [g for g in manifest.golden if variant in g.logits]
    if not samples:
        return 0.0
    x = normalize(np.asarray([g.input for g in samples], dtype=np.float32), manifest.normalization)
    got = backend.run(x)
    want = np.asarray([g.logits[variant] for g in samples], dtype=np.float32)
    if got.shape != want.shape:
        raise ModelRejected(f"{variant}: golden output shape {got.shape} != {want.shape}")
    diff = np.abs(got.astype(np.float64) - want)
    worst = float(np.max(diff)) if np.all(np.isfinite(got)) else float("inf")
    rule = manifest.golden_rule(variant)
    why = _legacy(manifest.golden_atol.get(variant, 1e-3), worst, got, want) if rule is None \
        else _int8_gap(rule, worst, float(np.mean(diff)), got, want)
    if why:
        raise ModelRejected(f"{variant}: golden inputs give different outputs ({why})")
    return worst


def _legacy(atol: float, worst: float, got: np.ndarray, want: np.ndarray) -> str | None:
    if worst > atol or not np.array_equal(got.argmax(axis=1), want.argmax(axis=1)):
        return f"max diff {worst:.4g} > {atol:.4g}" if worst > atol else "arg-max changed"
    return None


def _int8_gap(rule: GoldenRule, worst: float, mean: float, got: np.ndarray,
              want: np.ndarray) -> str | None:
    """The ``int8-gap`` rule: every logit within ``atol``, their mean within ``mean_atol``
    (a model off everywhere by a little is still another model), and the arg-max kept on
    every golden input that is not a near-tie (recorded margin above ``argmax_margin``)."""
    if not worst <= rule.atol:
        return f"max diff {worst:.4g} > {rule.atol:.4g}, int8-gap rule"
    if mean > rule.mean_atol:
        return f"mean diff {mean:.4g} > {rule.mean_atol:.4g}, int8-gap rule"
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > rule.argmax_margin
    flipped = np.flatnonzero(clear & (got.argmax(axis=1) != want.argmax(axis=1)))
    if flipped.size:
        return (f"arg-max changed on golden input {int(flipped[0])} whose margin exceeds "
                f"{rule.argmax_margin:.4g}, int8-gap rule")
    return None
