"""Canary records planted in one simulated device's data, for the one-run privacy audit.

A canary is an out-of-distribution input (each feature drawn at ``spread`` standard
deviations around the task's mean, independently) with a uniformly random label: no real
record explains it, so a model that fits it has memorized that very record. Each of the
``m`` canaries is trained on with probability 1/2 (the audit's secret), appended to the
training share of device ``target`` and never to its held-out share. Training goes
through the production ClientApp code (:func:`~edgefleet.device.fl.client.make_client_app`):
only the data loader differs, as for every simulated device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from flwr.clientapp import ClientApp

from edgefleet.device.fl.client import LocalData, NodeSettings, make_client_app
from edgefleet.models.core.tasks import get_task
from edgefleet.models.sim.fl_app import builtin_share

__all__ = ["Canaries", "canary_app", "make_canaries"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Canaries:
    """``m`` canary records and which of them were trained on (``included``)."""

    x: F32
    y: I64
    included: npt.NDArray[np.bool_]

    @property
    def m(self) -> int:
        return len(self.y)


def make_canaries(task: str, m: int, rng: np.random.Generator, spread: float = 2.0) -> Canaries:
    """``m`` random canaries of ``task``, each included with probability 1/2."""
    t = get_task(task)
    split = t.split()
    mean = split.x_train.mean(axis=0)
    std = split.x_train.std(axis=0) + 1e-6
    x = (mean + spread * std * rng.standard_normal((m, t.n_features))).astype(np.float32)
    y = rng.integers(0, t.n_classes, size=m).astype(np.int64)
    return Canaries(x, y, rng.random(m) < 0.5)


def canary_app(canaries: Canaries, target: int = 0) -> ClientApp:
    """The simulated devices' ClientApp; device ``target`` also trains on the included canaries."""

    def load(s: NodeSettings) -> LocalData:
        data = builtin_share(s)
        if s.partition_id != target:
            return data
        keep = canaries.included
        return LocalData.from_split(
            np.concatenate([data.x_train, canaries.x[keep]]).astype(np.float32),
            np.concatenate([data.y_train, canaries.y[keep]]).astype(np.int64),
            data.x_test, data.y_test, public=True)

    return make_client_app(load)
