"""The ClientApp of simulated devices: the real device ClientApp on built-in task shares.

A simulated device (the demo, tests, benchmarks, ``edgefleet train``'s embedded
federation) holds partition ``partition-id`` of ``num-partitions`` Dirichlet shares of a
built-in task's training split, unless node-config ``data`` names stored samples. The
production ClientApp (``edgefleet.device.fl.client:app``) has no such fallback: a device
trains only on what it stored, and evaluates on its held-out records only as its privacy
policy allows (off by default), while this app evaluates exactly. The share is cached
in the node's state folder (:mod:`edgefleet.models.sim.share_cache`) because Flower
starts a process per message.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.fl.client import (
    LocalData,
    NodeSettings,
    make_client_app,
    state_dir,
    stored_samples,
)
from edgefleet.models.core.partition import dirichlet_partition
from edgefleet.models.core.tasks import get_task
from edgefleet.models.sim.share_cache import cached_share, share_key

__all__ = ["APP_REF", "app", "builtin_share", "demo_share", "export_partition"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: How a Flower app bundle names this ClientApp.
APP_REF = "edgefleet.models.sim.fl_app:app"


def builtin_share(s: NodeSettings) -> LocalData:
    """Stored samples when the node has them (``sample-store``: every agent's SuperNode;
    or ``data``), else this node's share of the built-in task: a SuperNode an enrolled
    agent runs never reaches the built-in data."""
    if s.data or s.sample_store:
        return stored_samples(s)
    return _builtin_share(s.model_dump_json())


@cache
def _builtin_share(key: str) -> LocalData:
    s = NodeSettings.model_validate_json(key)
    if s.partition_id >= s.num_partitions:
        raise ConfigError(f"partition-id {s.partition_id} >= num-partitions {s.num_partitions}")
    cache_key = share_key(s.task, s.partition_id, s.num_partitions, s.alpha, s.partition_seed)
    x, y = cached_share(state_dir(s), cache_key, lambda: demo_share(s))
    return LocalData(x, y, seed=s.partition_id, public=True)


def demo_share(s: NodeSettings) -> tuple[F32, I64]:
    """Partition ``partition-id`` of the task's training split (what the cache stores)."""
    split = get_task(s.task).split()
    part = _partition(s.task, s.num_partitions, s.alpha, s.partition_seed)[s.partition_id]
    return split.x_train[part], split.y_train[part]


@cache
def _partition(task: str, n: int, alpha: float, seed: int) -> list[npt.NDArray[np.intp]]:
    return dirichlet_partition(get_task(task).split().y_train, n, alpha, seed)


def export_partition(task: str, index: int, count: int, out: Path) -> Path:
    """Device ``index``'s share as ``samples.npz`` (``x``, ``y``) for a device that holds
    its own samples (node-config ``data``), e.g. an emulated Pi without scikit-learn: the
    same Dirichlet partition a simulated device trains on."""
    s = NodeSettings.model_validate({"task": task, "partition_id": index,
                                     "num_partitions": count})
    x, y = demo_share(s)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x, y=y)
    return out


#: Evaluation is released exactly: a simulated device's records are a share of a public
#: task (or, with ``data``, an exported one), not anyone's private data. Training still
#: follows the node's privacy policy like a deployed device's.
app = make_client_app(builtin_share)
