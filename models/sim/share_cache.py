"""A demo device's data share, cached in its state folder as one ``.npz``.

Flower starts a fresh ClientApp process for every message, and building a demo share
means importing scikit-learn, loading the task, splitting it and drawing the Dirichlet
partition (~0.7 s) each time. The share is a pure function of (task, partition id,
number of partitions, α, seed) and of the code (:data:`FORMAT`, edgefleet's version), so
the first message stores it and later ones read it.
The file holds its key; zip's CRC-32 of every member, which ``np.load`` verifies on read,
catches damage. A file for another key, a damaged or truncated file, or one from an older
format is rebuilt, never an error.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.cli_support import edgefleet_version
from edgefleet.device.core.durable import atomic_write_bytes

__all__ = ["FORMAT", "cached_share", "share_key", "share_path"]

log = logging.getLogger(__name__)
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
#: Bump when splitting or partitioning changes, so that older caches are rebuilt.
FORMAT = 1


def share_key(task: str, partition_id: int, num_partitions: int, alpha: float,
              seed: int) -> str:
    """What a demo share is a function of (floats by ``repr``: exact), and which code made it."""
    return (f"share v{FORMAT} task={task} partition={partition_id}/{num_partitions} "
            f"alpha={float(alpha)!r} seed={seed} edgefleet {edgefleet_version()}")


def share_path(state_dir: Path, key: str) -> Path:
    """One file per key, so nodes or tasks sharing a folder do not evict each other."""
    return state_dir / f"demo-share-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _read(path: Path, key: str) -> tuple[F32, I64] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            stored_key = str(f["key"])
            x, y = np.asarray(f["x"]), np.asarray(f["y"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # zip (bad CRC-32), format or I/O errors: the cache is only a cache
        log.warning("data share cache %s unreadable (%s); rebuilding", path, exc)
        return None
    if stored_key != key or x.dtype != np.float32 or y.dtype != np.int64:
        log.warning("data share cache %s does not match %r; rebuilding", path, key)
        return None
    return x, y


def cached_share(state_dir: Path, key: str,
                 build: Callable[[], tuple[F32, I64]]) -> tuple[F32, I64]:
    """The arrays ``build()`` returns for ``key``, read from ``state_dir`` when stored there."""
    path = share_path(state_dir, key)
    got = _read(path, key)
    if got is not None:
        return got
    x, y = build()
    x, y = np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, key=np.array(key))
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:  # a read-only state folder costs time, not correctness
        log.warning("cannot write data share cache %s: %s", path, exc)
    return x, y
