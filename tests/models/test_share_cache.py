"""The demo data share cached in the node's state folder: same data, rebuilt when damaged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.fl import client as fl_client
from edgefleet.models.sim import fl_app
from edgefleet.models.sim.share_cache import cached_share, share_key, share_path

CFG = {"partition-id": 2, "num-partitions": 5}
BUILD_SHARE = fl_app.demo_share  # the real builder, whatever a test spies on


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Partition ids of every share really built from the task (a cache hit builds none)."""
    calls: list[int] = []
    def spy(s: fl_client.NodeSettings) -> tuple[np.ndarray, np.ndarray]:
        calls.append(s.partition_id)
        return BUILD_SHARE(s)

    monkeypatch.setattr(fl_app, "demo_share", spy)
    fl_app._builtin_share.cache_clear()  # each load below is a fresh process's
    return calls


def _load(tmp_path: Path, **extra: object) -> fl_client.LocalData:
    fl_app._builtin_share.cache_clear()
    return fl_app.builtin_share(fl_client.node_settings(
        {**CFG, "state-dir": str(tmp_path), **extra}))


def _same(a: fl_client.LocalData, b: fl_client.LocalData) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        got, want = getattr(a, name), getattr(b, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def _fresh() -> fl_client.LocalData:
    """The share computed from the task, as before there was a cache."""
    s = fl_client.node_settings(CFG)
    x, y = BUILD_SHARE(s)
    return fl_client.LocalData(x, y, seed=s.partition_id)


def test_cache_hit_gives_the_same_local_data_as_a_fresh_partition(
        tmp_path: Path, builds: list[int]) -> None:
    first = _load(tmp_path)
    assert builds == [2]
    files = list(tmp_path.glob("demo-share-*.npz"))
    assert len(files) == 1
    again = _load(tmp_path)
    assert builds == [2]  # read from the file
    fresh = _fresh()
    _same(first, fresh)
    _same(again, fresh)
    # Another key (α) is another file with other data; both stay cached.
    other = _load(tmp_path, alpha=5.0)
    assert builds == [2, 2] and len(list(tmp_path.glob("demo-share-*.npz"))) == 2
    assert len(other.y_train) != len(fresh.y_train) or \
        not np.array_equal(other.y_train, fresh.y_train)
    _same(_load(tmp_path), fresh)
    assert builds == [2, 2]


def _truncate(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _flip_a_data_byte(b: bytes) -> bytes:
    i = len(b) // 3  # inside the x array
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1:]


@pytest.mark.parametrize("damage", [_truncate, _flip_a_data_byte, lambda _: b"",
                                    lambda _: b"PK\x03\x04garbage"])
def test_damaged_share_cache_is_rebuilt_with_the_same_data(
        tmp_path: Path, builds: list[int], damage: Callable[[bytes], bytes]) -> None:
    expected = _load(tmp_path)
    (path,) = tmp_path.glob("demo-share-*.npz")
    path.write_bytes(damage(path.read_bytes()))
    _same(_load(tmp_path), expected)
    assert builds == [2, 2]
    _same(_load(tmp_path), expected)  # rewritten: a hit again
    assert builds == [2, 2]


def _arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(7, 3)).astype(np.float32), rng.integers(0, 4, 7).astype(np.int64)


def test_a_file_stored_for_another_key_is_rebuilt(tmp_path: Path) -> None:
    key_a, key_b = share_key("digits", 0, 5, 0.5, 0), share_key("digits", 1, 5, 0.5, 0)
    cached_share(tmp_path, key_a, lambda: _arrays(0))
    # Share A's (intact, checksummed) file where share B's belongs: a mismatch, not B.
    share_path(tmp_path, key_b).write_bytes(share_path(tmp_path, key_a).read_bytes())
    x, y = cached_share(tmp_path, key_b, lambda: _arrays(1))
    np.testing.assert_array_equal(x, _arrays(1)[0])
    np.testing.assert_array_equal(y, _arrays(1)[1])
    built: list[int] = []
    x, _ = cached_share(tmp_path, key_b, lambda: built.append(1) or _arrays(2))
    assert not built
    np.testing.assert_array_equal(x, _arrays(1)[0])


def test_key_names_every_input_exactly() -> None:
    keys = {share_key("digits", 0, 5, 0.5, 0), share_key("vibration", 0, 5, 0.5, 0),
            share_key("digits", 1, 5, 0.5, 0), share_key("digits", 0, 6, 0.5, 0),
            share_key("digits", 0, 5, 0.5 + 1e-12, 0), share_key("digits", 0, 5, 0.5, 1)}
    assert len(keys) == 6
