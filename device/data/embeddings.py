"""Backbone embeddings of stored samples, cached per sample id and backbone version.

Fine-tuning an imported model's head (docs/bring-your-own-model.md) runs the frozen int8
backbone over every stored sample once; Flower starts each round in a fresh process, so
the embeddings live in a file next to the sample store: ``<store>.embeddings/<sha>.npz``
(folder ``0700``, file ``0600``), named by the backbone file's sha256. A new backbone
makes every other file stale: it is deleted on first use (``embed_cache_invalidated``).
Bounded to ``max_rows`` embeddings (the newest sample ids: the store evicts the oldest);
an unreadable file is a miss, rewritten (``embed_cache_unreadable``), never a crash.
Embeddings are derived from the samples, so a store sealed with a key gets no cache
(the client recomputes them each round) rather than a plaintext copy.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.durable import atomic_write_bytes
from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = ["EmbeddingCache", "cache_folder"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_SHA = re.compile(r"^[0-9a-f]{64}$")


def cache_folder(store_path: Path) -> Path:
    """Where the embeddings of the store at ``store_path`` are kept."""
    return store_path.with_name(store_path.name + ".embeddings")


class EmbeddingCache:
    """Embeddings of sample ids under one backbone version (see the module docstring)."""

    def __init__(self, folder: Path, backbone_sha256: str, *, max_rows: int = 10_000,
                 metrics: Metrics | None = None) -> None:
        if not _SHA.fullmatch(backbone_sha256):
            raise ValueError("backbone_sha256 must be 64 hex digits")
        self.folder = folder
        self.path = folder / f"{backbone_sha256}.npz"
        self.max_rows = max_rows
        self.metrics = metrics or default_metrics()

    def _load(self) -> tuple[I64, F32 | None]:
        try:
            with np.load(self.path, allow_pickle=False) as f:
                ids, emb = np.asarray(f["ids"], np.int64), np.asarray(f["emb"], np.float32)
            if ids.ndim != 1 or emb.ndim != 2 or len(ids) != len(emb):
                raise ValueError("shapes")
            return ids, emb
        except FileNotFoundError:
            return np.zeros(0, np.int64), None
        except (OSError, ValueError, KeyError):
            self.metrics.inc("embed_cache_unreadable")
            return np.zeros(0, np.int64), None

    def _invalidate_others(self) -> None:
        for p in self.folder.glob("*.npz"):
            if p != self.path:
                p.unlink(missing_ok=True)
                self.metrics.inc("embed_cache_invalidated")

    def get(self, ids: I64, x: F32, compute: Callable[[F32], F32]) -> F32:
        """Embeddings of the rows ``x`` (sample ``ids``), computing only what is missing."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._invalidate_others()
        ids = np.asarray(ids, np.int64)
        c_ids, c_emb = self._load()
        pos = {int(i): k for k, i in enumerate(c_ids)}
        hit = np.array([int(i) in pos for i in ids], dtype=bool)
        self.metrics.inc("embed_cache_hit", int(hit.sum()))
        self.metrics.inc("embed_cache_miss", int((~hit).sum()))
        if hit.all() and c_emb is not None:
            return c_emb[[pos[int(i)] for i in ids]]
        new = np.asarray(compute(x[~hit]), np.float32)
        if c_emb is not None and c_emb.shape[1] != new.shape[1]:
            c_ids, c_emb = np.zeros(0, np.int64), None
            hit[:] = False
            new = np.asarray(compute(x), np.float32)
        out = np.empty((len(ids), new.shape[1]), np.float32)
        out[~hit] = new
        if hit.any() and c_emb is not None:
            out[hit] = c_emb[[pos[int(i)] for i in ids[hit]]]
        keep = {int(i): row for i, row in zip(c_ids, c_emb if c_emb is not None else [],
                                              strict=False)}
        keep.update({int(i): row for i, row in zip(ids, out, strict=True)})
        order = sorted(keep)[-self.max_rows:]
        buf = io.BytesIO()
        np.savez(buf, ids=np.asarray(order, np.int64),
                 emb=np.stack([keep[i] for i in order]).astype(np.float32))
        atomic_write_bytes(self.path, buf.getvalue(), mode=0o600)
        return out
