"""How closely a device must reproduce each variant's golden logits (one rule, two builders).

``models build`` and ``models import`` both record, per variant, ``golden_atol`` (the
tolerance every reader applies: 1e-3 for fp32, 5 % of the largest golden logit for
int8) and, for an int8 variant with an fp32 sibling, an ``int8-gap`` rule
(:class:`~edgefleet.device.runtime.manifest.GoldenRule`, in the manifest's ``extra``).

Why the rule: onnxruntime's fused int8 kernels on aarch64 round a few activations one
step differently from x86-64's (which match the float QDQ reference), and a deep network
(MobileNetV2: ~50 requantized layers) amplifies those steps to about 11 output steps, far
beyond 5 % of the logits, while the answers agree as often as two int8 builds do. The
scale of honest disagreement is the quantization error itself: the rule lets a device's
int8 logits differ from the recorded ones by as much as int8 differs from fp32 on the same
golden inputs (largest and mean), never less than the old tolerance, and keeps the arg-max
wherever the recorded top-2 margin exceeds twice that mean (docs/model-package.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.runtime.manifest import GoldenRule

__all__ = ["golden_tolerances"]

F32 = npt.NDArray[np.float32]
#: The float variants an int8 variant's quantization error is measured against, in order.
_REFERENCES = ("onnx-fp32", "tflite-fp32")


def golden_tolerances(golden_logits: Mapping[str, F32], precision: Mapping[str, str]
                      ) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """``golden_atol`` per variant and the ``int8-gap`` rules (variant → rule as JSON).

    ``golden_logits`` holds every variant's logits on the golden inputs (same rows),
    ``precision`` each variant's ``fp32``/``int8``.
    """
    atol: dict[str, float] = {}
    rules: dict[str, dict[str, Any]] = {}
    ref = next((r for r in _REFERENCES if r in golden_logits and precision.get(r) == "fp32"),
               None)
    for key, logits in golden_logits.items():
        if precision[key] == "fp32":
            atol[key] = 1e-3
            continue
        legacy = max(0.05 * float(np.max(np.abs(logits))), 1e-2)
        atol[key] = legacy
        if ref is None:
            continue
        gap = np.abs(logits.astype(np.float64) - golden_logits[ref])
        mean_atol = max(legacy, float(np.mean(gap)))
        rules[key] = GoldenRule(
            rule="int8-gap", atol=max(legacy, float(np.max(gap))), mean_atol=mean_atol,
            argmax_margin=2 * mean_atol, reference=ref, fp32_gap_max=float(np.max(gap)),
            fp32_gap_mean=float(np.mean(gap)),
        ).model_dump(mode="json")
    return atol, rules
