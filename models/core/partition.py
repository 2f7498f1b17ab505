"""Deterministic non-IID partitioning of a task's training data over devices.

Label proportions per device follow a Dirichlet(α) draw, the usual way to make
federated data skewed (small α → each device sees few classes). The same
``(n_devices, alpha, seed)`` always gives the same partition, so device ``i`` of a demo
or benchmark can select its share by index alone.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["dirichlet_partition"]


def dirichlet_partition(
    y: npt.NDArray[np.integer],
    n_devices: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[npt.NDArray[np.intp]]:
    """Split sample indices into ``n_devices`` disjoint, label-skewed shares.

    Every sample lands on exactly one device. Draws are repeated (deterministically)
    until each device holds at least ``min_size`` samples, when that is possible.
    """
    if n_devices < 1:
        raise ValueError("n_devices must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    floor = min(min_size, len(y) // n_devices)
    for _attempt in range(1000):
        shares: list[list[npt.NDArray[np.intp]]] = [[] for _ in range(n_devices)]
        for cls in classes:
            idx = np.flatnonzero(y == cls)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(n_devices, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for dev, part in enumerate(np.split(idx, cuts)):
                shares[dev].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(p) for p in parts) >= floor:
            return parts
    return parts
