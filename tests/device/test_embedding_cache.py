"""The embedding cache of head fine-tuning: hits, misses, a new backbone, bounds, damage."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.data.embeddings import EmbeddingCache, cache_folder

SHA_A, SHA_B = "a" * 64, "b" * 64


class _Backbone:
    """Counts the rows it embeds (the cache must not call it for hits)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.rows = 0
        self.scale = scale

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.rows += len(x)
        return (x[:, :3] * self.scale).astype(np.float32)


def _x(ids: np.ndarray) -> np.ndarray:
    return np.stack([np.full(5, float(i), np.float32) for i in ids])


def test_hits_skip_the_backbone_and_misses_are_computed_once(tmp_path: Path) -> None:
    m = Metrics()
    folder = cache_folder(tmp_path / "samples.db")
    ids = np.arange(1, 11, dtype=np.int64)
    bb = _Backbone()
    first = EmbeddingCache(folder, SHA_A, metrics=m).get(ids, _x(ids), bb)
    assert bb.rows == 10 and m.counter("embed_cache_miss") == 10
    # a new process (each Flower message is one): same ids plus two new samples
    more = np.arange(1, 13, dtype=np.int64)
    got = EmbeddingCache(folder, SHA_A, metrics=m).get(more, _x(more), bb)
    assert bb.rows == 12 and m.counter("embed_cache_hit") == 10
    np.testing.assert_array_equal(got[:10], first)
    np.testing.assert_array_equal(got, bb(_x(more)))
    # owner-only folder and file
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / f"{SHA_A}.npz").stat().st_mode) == 0o600


def test_a_new_backbone_invalidates_the_old_embeddings(tmp_path: Path) -> None:
    m = Metrics()
    folder = tmp_path / "emb"
    ids = np.arange(5, dtype=np.int64)
    EmbeddingCache(folder, SHA_A, metrics=m).get(ids, _x(ids), _Backbone())
    new_bb = _Backbone(scale=2.0)
    got = EmbeddingCache(folder, SHA_B, metrics=m).get(ids, _x(ids), new_bb)
    assert new_bb.rows == 5, "nothing of the old backbone may be reused"
    np.testing.assert_array_equal(got, _x(ids)[:, :3] * 2)
    assert m.counter("embed_cache_invalidated") == 1
    assert [p.name for p in folder.iterdir()] == [f"{SHA_B}.npz"]


def test_the_cache_is_bounded_to_the_newest_samples(tmp_path: Path) -> None:
    ids = np.arange(100, dtype=np.int64)
    EmbeddingCache(tmp_path, SHA_A, max_rows=30).get(ids, _x(ids), _Backbone())
    with np.load(tmp_path / f"{SHA_A}.npz") as f:
        assert list(f["ids"]) == list(range(70, 100))


def test_an_unreadable_cache_is_a_miss_not_a_crash(tmp_path: Path) -> None:
    m = Metrics()
    (tmp_path / f"{SHA_A}.npz").write_bytes(b"not a zip")
    ids = np.arange(4, dtype=np.int64)
    bb = _Backbone()
    got = EmbeddingCache(tmp_path, SHA_A, metrics=m).get(ids, _x(ids), bb)
    assert bb.rows == 4 and m.counter("embed_cache_unreadable") == 1
    np.testing.assert_array_equal(got, _x(ids)[:, :3])
