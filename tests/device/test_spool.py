"""The telemetry spool: durable, capped (count, bytes, age) with drop-oldest, private,
self-healing, and safe on a full disk (a real one: a small tmpfs)."""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path

import pytest

from edgefleet.device.agent.settings import AgentConfig, ModelSection, load_agent_config
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.telemetry.spool import DEFAULT_MAX_BYTES, MemorySpool, Spool
from tests.support.tmpfs import fill, small_tmpfs


def test_append_pending_ack_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "spool.db"
    sp = Spool(path, metrics=Metrics())
    ids = [sp.append("t", f"m{i}".encode()) for i in range(10)]
    assert sp.count() == 10
    rows = sp.pending(0, 4)
    assert [r[0] for r in rows] == ids[:4]
    assert rows[0][2] == b"m0"
    assert [r[0] for r in sp.pending(ids[3], 100)] == ids[4:]
    sp.ack([*ids[:4], 999999])  # an unknown id is ignored
    assert sp.count() == 6
    sp.close()
    again = Spool(path, metrics=Metrics())
    assert again.count() == 6
    assert [p for _, _, p in again.pending(0, 100)] == [f"m{i}".encode() for i in range(4, 10)]
    again.close()


def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    sp = Spool(path, metrics=Metrics())
    sp.append("t", b"x")
    for f in (path, Path(f"{path}-wal")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    sp.close()


def test_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    m = Metrics()
    sp = Spool(tmp_path / "spool.db", max_messages=100, metrics=m)
    for i in range(1000):  # 10x the cap while "offline"
        sp.append("t", str(i).encode())
        assert sp.count() <= 100
    assert sp.count() == 100
    assert sp.dropped() == 900
    assert m.counter("telemetry_spool_dropped") == 900
    kept = [int(p) for _, _, p in sp.pending(0, 1000)]
    assert kept == list(range(900, 1000))  # the newest survive
    sp.close()
    # the dropped total is persisted with the spool
    assert Spool(tmp_path / "spool.db", max_messages=100, metrics=Metrics()).dropped() == 900


def test_corrupt_spool_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a database" * 100)
    m = Metrics()
    sp = Spool(path, metrics=m)
    assert m.counter("telemetry_spool_quarantined") == 1
    quarantined = list(tmp_path.glob("spool.db.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes().startswith(b"this is not")
    sp.append("t", b"fresh")
    assert sp.count() == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_truncated_spool_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    sp = Spool(path, metrics=Metrics())
    for i in range(500):
        sp.append("t", bytes(200) + str(i).encode())
    sp.close()
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 50 + data[150:])  # a damaged header
    m = Metrics()
    fresh = Spool(path, metrics=m)
    assert m.counter("telemetry_spool_quarantined") == 1
    assert fresh.count() == 0


def test_memory_spool_same_contract() -> None:
    sp = MemorySpool(max_messages=3, metrics=Metrics())
    ids = [sp.append("t", bytes([i])) for i in range(5)]
    assert sp.count() == 3
    assert sp.dropped() == 2
    assert [r[0] for r in sp.pending(0, 10)] == ids[2:]
    sp.ack([ids[2]])
    assert [r[0] for r in sp.pending(0, 10)] == ids[3:]


def test_byte_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    m = Metrics()
    sp = Spool(tmp_path / "spool.db", max_bytes=10_000, metrics=m)
    sizes = [100, 3000, 50, 2000, 4000, 700, 1500, 2500, 80, 3900]
    ids = [sp.append("t", bytes([i]) * (n - 1)) for i, n in enumerate(sizes)]
    kept = [r[0] for r in sp.pending(0, 100)]
    # the newest messages that fit in 10,000 bytes survive, in order; the rest are counted
    fit, total = [], 0
    for i, n in reversed(list(zip(ids, sizes, strict=True))):
        if total + n > 10_000:
            break
        fit.insert(0, i)
        total += n
    assert kept == fit and len(kept) < len(ids)
    assert sp.nbytes() == total <= 10_000
    assert sp.dropped() == m.counter("telemetry_spool_dropped") == len(ids) - len(kept)
    sp.ack(kept[:2])
    assert sp.nbytes() == total - sum(sizes[len(ids) - len(kept):][:2])
    before = sp.nbytes()
    sp.close()
    again = Spool(tmp_path / "spool.db", max_bytes=10_000, metrics=Metrics())
    assert again.nbytes() == before  # recomputed from the file
    assert again.dropped() == len(ids) - len(kept)
    again.close()


def test_both_caps_apply_and_oversized_message_is_dropped(tmp_path: Path) -> None:
    m = Metrics()
    sp = Spool(tmp_path / "spool.db", max_messages=5, max_bytes=1000, metrics=m)
    for i in range(8):  # 10 bytes each: the message cap binds
        sp.append("t", b"%09d" % i)
    assert [p for _, _, p in sp.pending(0, 100)] == [b"%09d" % i for i in range(3, 8)]
    assert sp.append("t", bytes(2000)) == 0  # can never fit: dropped, nothing else lost
    assert sp.count() == 5 and sp.dropped() == 4
    sp.append("t", bytes(599))  # 600 bytes: the byte cap binds, oldest go first
    assert [p for _, _, p in sp.pending(0, 100)][-1] == bytes(599)
    assert sp.nbytes() <= 1000 and sp.count() == 5
    assert sp.dropped() == m.counter("telemetry_spool_dropped") == 5
    sp.close()


def test_max_age_drops_old_messages_on_append(tmp_path: Path) -> None:
    m = Metrics()
    sp = Spool(tmp_path / "spool.db", max_age_s=0.2, metrics=m)
    for i in range(5):
        sp.append("t", b"old%d" % i)
    time.sleep(0.3)
    sp.append("t", b"new")
    assert [p for _, _, p in sp.pending(0, 100)] == [b"new"]
    assert sp.dropped() == 5
    assert m.counter("telemetry_spool_expired") == m.counter("telemetry_spool_dropped") == 5
    sp.close()


def test_memory_spool_byte_cap() -> None:
    sp = MemorySpool(max_bytes=100, metrics=Metrics())
    for i in range(10):
        sp.append("t", bytes([i]) * 29)  # 30 bytes each: 3 fit
    assert [p[0] for _, _, p in sp.pending(0, 10)] == [7, 8, 9]
    assert sp.nbytes() == 90 and sp.dropped() == 7


def test_agent_config_spool_bounds(tmp_path: Path) -> None:
    cfg = AgentConfig(device_id="d", model=ModelSection(package=tmp_path))
    assert cfg.telemetry.spool_max_bytes == DEFAULT_MAX_BYTES
    assert cfg.telemetry.spool_max_age_s is None
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d"\n[model]\npackage = "pkg"\n'
                    "[telemetry]\nspool_max_bytes = 1048576\nspool_max_age_s = 86400\n")
    t = load_agent_config(path).telemetry
    assert (t.spool_max_bytes, t.spool_max_age_s) == (1024 * 1024, 86400)
    with pytest.raises(Exception, match="spool_max_bytes"):
        path.write_text('device_id = "d"\n[model]\npackage = "pkg"\n'
                        "[telemetry]\nspool_max_bytes = 1000\n")
        load_agent_config(path)


# -- a real full disk: a 512 KiB tmpfs holds the spool -------------------------------------

def _payload(i: int) -> bytes:
    return b"%06d" % i + bytes(1000)


def test_disk_full_drops_oldest_and_retries(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        m = Metrics()
        sp = Spool(disk / "spool.db", reserve_bytes=64 * 1024, metrics=m)
        try:
            for i in range(60):
                assert sp.append("t", _payload(i))
            assert (disk / "spool.db.reserve").stat().st_size == 64 * 1024
            assert fill(disk / "filler") > 0
            stored = [sp.append("t", _payload(i)) for i in range(60, 400)]  # nothing raises
            assert all(stored)  # room came from the reserve, then from the oldest messages
            assert m.counter("telemetry_spool_disk_full_retries") >= 1
            assert m.counter("telemetry_spool_reserve_released") == 1
            held = [int(p[:6]) for _, _, p in sp.pending(0, 1000)]
            assert held == list(range(400 - len(held), 400))  # drop-oldest, newest kept
            assert sp.dropped() == m.counter("telemetry_spool_dropped") == 400 - len(held)
            assert m.counter("telemetry_spool_disk_full") == 0
            sp.ack([i for i, _, _ in sp.pending(0, 10)])
            assert sp.count() == len(held) - 10
            (disk / "filler").unlink()
            for i in range(400, 450):
                assert sp.append("t", _payload(i))
            assert m.counter("telemetry_spool_disk_recovered") == 1
            assert (disk / "spool.db.reserve").stat().st_size == 64 * 1024
            assert sp.dropped() == 400 - len(held)  # the full byte cap is back: no drops
            assert sp.count() == len(held) - 10 + 50
        finally:
            sp.close()


def test_disk_full_without_room_keeps_what_it_holds(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        m = Metrics()
        sp = Spool(disk / "spool.db", reserve_bytes=0, metrics=m)  # nothing to give back
        try:
            for i in range(10):
                assert sp.append("t", _payload(i))
            fill(disk / "filler")
            assert [sp.append("t", _payload(i)) for i in range(10, 30)] == [0] * 20
            assert m.counter("telemetry_spool_disk_full") == 20
            assert sp.dropped() == m.counter("telemetry_spool_dropped") == 20
            rows = sp.pending(0, 100)
            assert [int(p[:6]) for _, _, p in rows] == list(range(10))  # nothing lost
            sp.ack([i for i, _, _ in rows[:4]])  # cannot be deleted now: remembered
            assert sp.count() == 6
            assert [i for i, _, _ in sp.pending(0, 100)] == [i for i, _, _ in rows[4:]]
            assert [i for i, _, _ in sp.pending(0, 3)] == [i for i, _, _ in rows[4:7]]
            assert m.counter("telemetry_spool_ack_deferred") == 4
            (disk / "filler").unlink()
            assert sp.append("t", _payload(30))
            assert m.counter("telemetry_spool_disk_recovered") == 1
            assert sp.count() == 7
            assert [int(p[:6]) for _, _, p in sp.pending(0, 100)] == [*range(4, 10), 30]
        finally:
            sp.close()
        again = Spool(disk / "spool.db", reserve_bytes=0, metrics=Metrics())
        try:  # the deferred deletes and the dropped total reached the file
            assert again.count() == 7 and again.dropped() == 20
        finally:
            again.close()


def test_full_disk_at_open_is_not_corruption(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk") as disk:
        sp = Spool(disk / "spool.db", reserve_bytes=64 * 1024, metrics=Metrics())
        for i in range(30):
            sp.append("t", _payload(i))
        sp.close()  # the WAL and -shm files go; reopening must create them
        fill(disk / "filler")
        m = Metrics()
        again = Spool(disk / "spool.db", reserve_bytes=64 * 1024, metrics=m)
        try:
            assert m.counter("telemetry_spool_quarantined") == 0
            assert m.counter("telemetry_spool_reserve_released") == 1
            assert again.count() == 30
        finally:
            again.close()
        (disk / "spool.db.reserve").unlink(missing_ok=True)
        fill(disk / "filler2")  # what the reserve and the closed WAL gave back
        with pytest.raises(sqlite3.OperationalError):  # no room at all: an error, no quarantine
            Spool(disk / "spool.db", reserve_bytes=0, metrics=m)
        assert not list(disk.glob("*.corrupt-*"))


def test_full_disk_at_open_with_a_reserve_that_will_not_go(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit test (fakes): releasing the reserve fails, so opening fails once, not forever."""
    Spool(tmp_path / "spool.db", reserve_bytes=64 * 1024, metrics=Metrics()).close()
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]

    def connect(_self: Spool) -> sqlite3.Connection:
        raise full

    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".reserve"):
            raise PermissionError(1, "Operation not permitted", str(self))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(Spool, "_connect", connect)
    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        Spool(tmp_path / "spool.db", reserve_bytes=64 * 1024, metrics=Metrics())
    assert not list(tmp_path.glob("*.corrupt-*"))
