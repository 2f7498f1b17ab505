"""Robust aggregation helpers: norm bounding of device updates, and per-device quality.

Norm bounding (Sun et al., 2019, "Can you really backdoor federated learning?") caps
how far one device can move the global model in a round: each device's update
``local − global`` is scaled down to L2 norm at most ``bound`` before any aggregation.
It blunts scaled updates even under plain FedAvg; trimmed mean and median (Flower's
``FedTrimmedAvg`` and ``FedMedian``) additionally ignore the extreme coordinates.

The per-device spread answers "is the average hiding a device the model fails on?":
min, median and max of the devices' federated-evaluation accuracy, the worst named.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Message

from edgefleet.device.wire.federated import ARRAYS

__all__ = ["bound_update", "bound_updates", "device_spread"]


def bound_update(global_params: Sequence[npt.NDArray[np.floating]],
                 local_params: Sequence[npt.NDArray[np.floating]], bound: float
                 ) -> tuple[list[npt.NDArray[np.float32]], float]:
    """``global + update·min(1, bound/‖update‖)`` and the update's original L2 norm."""
    deltas = [np.asarray(p, dtype=np.float64) - np.asarray(g, dtype=np.float64)
              for g, p in zip(global_params, local_params, strict=True)]
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas)))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    out = [np.asarray(np.asarray(g, dtype=np.float64) + scale * d, dtype=np.float32)
           for g, d in zip(global_params, deltas, strict=True)]
    return out, norm


def bound_updates(global_arrays: ArrayRecord, replies: Iterable[Message], bound: float
                  ) -> tuple[list[Message], list[float]]:
    """Bound every reply's update in place; returns the replies and the original norms.

    A reply whose arrays do not match the global model's shapes is left for the
    strategy to refuse (Flower checks consistency before aggregating).
    """
    g = global_arrays.to_numpy_ndarrays()
    out: list[Message] = []
    norms: list[float] = []
    for msg in replies:
        out.append(msg)
        rec = msg.content.array_records.get(ARRAYS)
        if rec is None:
            continue
        local = rec.to_numpy_ndarrays()
        if [a.shape for a in local] != [a.shape for a in g]:
            continue
        clipped, norm = bound_update(g, local, bound)
        norms.append(norm)
        msg.content[ARRAYS] = ArrayRecord(clipped)
    return out, norms


def device_spread(accuracy: Mapping[int, float]) -> dict[str, Any] | None:
    """``{devices, min, median, max, worst, per_node}`` of per-node accuracy (None if empty).

    ``per_node`` keys are node ids as text (JSON object keys).
    """
    if not accuracy:
        return None
    worst = min(accuracy, key=lambda n: (accuracy[n], n))
    vals = list(accuracy.values())
    return {"devices": len(vals), "min": min(vals), "median": statistics.median(vals),
            "max": max(vals), "worst": worst,
            "per_node": {str(n): a for n, a in sorted(accuracy.items())}}
