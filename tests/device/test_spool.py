"""The telemetry spool: durable, capped with drop-oldest, private, self-healing."""

from __future__ import annotations

import stat
from pathlib import Path

from edgefleet.device.metrics import Metrics
from edgefleet.device.spool import MemorySpool, Spool


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
