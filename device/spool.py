"""Store-and-forward spool: every telemetry message is on disk before it is sent.

paho keeps unacknowledged messages in memory only and mosquitto acknowledges before it
persists, so the device owns durability: a message is appended to a SQLite database in
WAL mode (survives SIGKILL of the agent; ``synchronous=NORMAL`` means a power cut can lose
the last few commits) and deleted only when the broker's PUBACK for it arrives.

Drop policy when full (``max_messages``): **drop oldest**. Fresh telemetry is worth more
than old telemetry after a long outage; every dropped message is counted in the spool's
own ``dropped`` total (persisted, reported in every metrics message) and in the metrics
registry as ``telemetry_spool_dropped``.

A spool file that SQLite cannot read is renamed ``<name>.corrupt-<unix time>`` and a fresh
one is created (``telemetry_spool_quarantined``): a bad file must never stop telemetry.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from edgefleet.device.metrics import Metrics, default_metrics

__all__ = ["MemorySpool", "Spool", "SpoolLike"]

log = logging.getLogger(__name__)

Row = tuple[int, str, bytes]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('dropped', 0);
"""


class SpoolLike(Protocol):
    """What the publisher needs from a spool (disk or memory)."""

    def append(self, topic: str, payload: bytes) -> int: ...
    def pending(self, after_id: int, limit: int) -> list[Row]: ...
    def ack(self, ids: Iterable[int]) -> None: ...
    def count(self) -> int: ...
    def dropped(self) -> int: ...
    def close(self) -> None: ...


def _create_private(path: Path) -> None:
    """Create ``path`` mode 0600 (SQLite gives its -wal/-shm files the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class Spool:
    """The on-disk spool; thread-safe (the app appends, the publisher reads and acks)."""

    def __init__(self, path: Path | str, *, max_messages: int = 50_000,
                 metrics: Metrics | None = None) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        self.path = Path(path)
        self.max_messages = max_messages
        self.metrics = metrics or default_metrics()
        self._lock = threading.Lock()
        self._db = self._open()
        self._count = int(self._db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def _connect(self) -> sqlite3.Connection:
        _create_private(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.executescript(_SCHEMA)
            db.execute("SELECT id, topic, payload, created FROM spool LIMIT 1").fetchall()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            stamp = int(time.time())
            bad = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            log.warning("telemetry spool %s is unreadable (%s); moved to %s, starting fresh",
                        self.path, exc, bad.name)
            self.metrics.inc("telemetry_spool_quarantined")
            self.path.replace(bad)
            for suffix in ("-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    side.replace(bad.with_name(bad.name + suffix))
            return self._connect()

    def append(self, topic: str, payload: bytes) -> int:
        """Store one message (committed before returning); drop the oldest when full."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                over = self._count + 1 - self.max_messages
                if over > 0:
                    cur = db.execute("DELETE FROM spool WHERE id IN "
                                     "(SELECT id FROM spool ORDER BY id LIMIT ?)", (over,))
                    gone = max(cur.rowcount, 0)
                    db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'",
                               (gone,))
                    self._count -= gone
                    self.metrics.inc("telemetry_spool_dropped", gone)
                cur = db.execute("INSERT INTO spool (topic, payload, created) VALUES (?, ?, ?)",
                                 (topic, payload, time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count += 1
            return int(cur.lastrowid or 0)

    def pending(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` unacknowledged messages with id > ``after_id``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit)).fetchall()
        return [(int(i), str(t), bytes(p)) for i, t, p in rows]

    def ack(self, ids: Iterable[int]) -> None:
        """Delete acknowledged messages (ids already gone are ignored)."""
        batch = [(i,) for i in ids]
        if not batch:
            return
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                before = db.total_changes
                db.executemany("DELETE FROM spool WHERE id = ?", batch)
                removed = db.total_changes - before
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count -= removed

    def count(self) -> int:
        """Messages waiting for a PUBACK."""
        return self._count

    def dropped(self) -> int:
        """Messages dropped by the full-spool policy since the spool file was created."""
        with self._lock:
            return int(self._db.execute(
                "SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])

    def close(self) -> None:
        """Close the database (a WAL checkpoint happens here)."""
        with self._lock:
            self._db.close()


class MemorySpool:
    """The same interface in memory: no durability (the benchmark's no-spool baseline)."""

    def __init__(self, max_messages: int = 1_000_000, metrics: Metrics | None = None) -> None:
        self.max_messages = max_messages
        self.metrics = metrics or default_metrics()
        self._rows: collections.OrderedDict[int, tuple[str, bytes]] = collections.OrderedDict()
        self._next = 1
        self._dropped = 0
        self._lock = threading.Lock()

    def append(self, topic: str, payload: bytes) -> int:
        """Queue one message in memory; drop the oldest when full."""
        with self._lock:
            while len(self._rows) >= self.max_messages:
                self._rows.popitem(last=False)
                self._dropped += 1
                self.metrics.inc("telemetry_spool_dropped")
            i = self._next
            self._next += 1
            self._rows[i] = (topic, payload)
            return i

    def pending(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` queued messages with id > ``after_id``."""
        with self._lock:
            out: list[Row] = []
            for i, (t, p) in self._rows.items():
                if i > after_id:
                    out.append((i, t, p))
                    if len(out) >= limit:
                        break
            return out

    def ack(self, ids: Iterable[int]) -> None:
        """Forget acknowledged messages."""
        with self._lock:
            for i in ids:
                self._rows.pop(i, None)

    def count(self) -> int:
        """Messages waiting for a PUBACK."""
        return len(self._rows)

    def dropped(self) -> int:
        """Messages dropped because the queue was full."""
        return self._dropped

    def close(self) -> None:
        """Nothing to close."""
