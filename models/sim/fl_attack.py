"""A malicious device's update, for tests and benchmarks of robust aggregation ONLY.

A SuperNode started with ``--node-config 'attack="signflip" attack-factor=10'`` trains
honestly and then sends a poisoned update instead: ``scale`` multiplies its update
(local − global) by the factor, ``signflip`` sends it negated and multiplied. This is
how ``tests/server/test_fl_robust.py`` and ``scripts/bench_robust.py`` show that
trimmed mean, median and norm bounding keep one bad device from wrecking the model; a
real deployment never sets ``attack`` (it is empty by default and logged loudly).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["ATTACKS", "Attack", "poison_update"]

log = logging.getLogger(__name__)

Attack = Literal["", "scale", "signflip"]
ATTACKS: tuple[str, ...] = ("scale", "signflip")


def poison_update(global_params: Sequence[npt.NDArray[np.floating]],
                  local_params: Sequence[npt.NDArray[np.floating]], attack: Attack,
                  factor: float) -> list[npt.NDArray[np.float32]]:
    """``global + factor·update`` (scale) or ``global − factor·update`` (signflip)."""
    if attack not in ATTACKS:
        return [np.asarray(p, dtype=np.float32) for p in local_params]
    sign = -1.0 if attack == "signflip" else 1.0
    log.warning("TEST/BENCHMARK ATTACK: sending a %s update (factor %g)", attack, factor)
    return [np.asarray(g + sign * factor * (p - g), dtype=np.float32)
            for g, p in zip(global_params, local_params, strict=True)]
