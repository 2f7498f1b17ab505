"""Store-and-forward spool: every telemetry message is on disk before it is sent.

paho keeps unacknowledged messages in memory only and mosquitto acknowledges before it
persists, so the device owns durability: a message is appended to a SQLite database in
WAL mode (survives SIGKILL of the agent; ``synchronous=NORMAL`` means a power cut can lose
the last few commits) and deleted only when the broker's PUBACK for it arrives.

Bounds, one policy: **drop oldest**. Fresh telemetry is worth more than old telemetry
after a long outage. ``max_messages`` caps the rows, ``max_bytes`` the sum of message
sizes (topic + payload bytes; SQLite's page overhead, the WAL and the reserve below come
on top) and ``max_age_s`` (off by default) drops, on each append, the oldest messages
older than that. Every dropped message is counted in the spool's own ``dropped`` total
(persisted, reported in every metrics message) and in the metrics registry as
``telemetry_spool_dropped``.

Disk full. A Raspberry Pi's SD card fills up; the spool must neither crash the agent nor
lose what it holds. In WAL mode SQLite grows the database file when it checkpoints, not
when it commits, so on a full disk even a DELETE can fail. Hence a reserve file
``<name>.reserve`` (``reserve_bytes``, 4 MiB) and a checkpoint before the WAL holds more
new pages than the reserve can take. When an append fails with SQLITE_FULL or ENOSPC, the
reserve is released, the WAL checkpointed, the oldest messages dropped to make room and
the append retried once; from then on the byte cap shrinks to what the spool holds, so
drop-oldest reuses the pages it frees instead of asking the disk for more. If the retry
fails too, the message is dropped (``telemetry_spool_disk_full`` and ``dropped``).
Acknowledged messages that cannot be deleted are remembered in memory and deleted by
the next write that works; what the spool holds is still read and published. When
free space comes back (looked at on each append while the disk is full) the reserve is
re-created and the cap returns to ``max_bytes``: no restart needed.

A spool file that SQLite cannot read is renamed ``<name>.corrupt-<unix time>`` and a fresh
one is created (``telemetry_spool_quarantined``): a bad file must never stop telemetry.
A full disk is not a bad file: it is never a reason to quarantine.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.sqlite import connect, migrate

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_RESERVE_BYTES", "MIGRATIONS", "MemorySpool", "Spool",
           "SpoolLike", "is_disk_full"]

log = logging.getLogger(__name__)

Row = tuple[int, str, bytes]

#: The byte cap when none is configured: a small share of a small SD card.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Disk kept back for the checkpoint that lets a full spool drop its oldest messages.
DEFAULT_RESERVE_BYTES = 4 * 1024 * 1024
#: Room in the reserve for one transaction beyond the checkpoint (a 64 KiB message).
_TXN_MARGIN = 128 * 1024
#: Pages freed beyond the message itself when a full disk forces a drop (whole pages).
_ROOM_PAGES = 2
#: Seconds between attempts to re-create a missing reserve while the disk is not full.
_RESERVE_RETRY_S = 30.0
#: Ids per ``IN (...)`` list (well under SQLite's bound-parameter limit).
_CHUNK = 500
_SIZE = "LENGTH(payload) + LENGTH(CAST(topic AS BLOB))"
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: The spool's schema versions (:mod:`edgefleet.device.core.sqlite`). Version 1 is the
#: schema spools had before versions were recorded, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: messages and the persisted drop count
        """CREATE TABLE IF NOT EXISTS spool (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            payload BLOB NOT NULL,
            created REAL NOT NULL)""",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT OR IGNORE INTO meta VALUES ('dropped', 0)",
    ],
]


class SpoolLike(Protocol):
    """What the publisher needs from a spool (disk or memory)."""

    def append(self, topic: str, payload: bytes) -> int: ...
    def pending(self, after_id: int, limit: int) -> list[Row]: ...
    def ack(self, ids: Iterable[int]) -> None: ...
    def count(self) -> int: ...
    def nbytes(self) -> int: ...
    def dropped(self) -> int: ...
    def close(self) -> None: ...


def is_disk_full(exc: BaseException) -> bool:
    """SQLITE_FULL or ENOSPC/EDQUOT: the storage, not the data, is the problem."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        # SHMSIZE: the -shm file could not grow, which is what a full disk does at open.
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and (code & 0xFF == sqlite3.SQLITE_FULL
                                     or code == sqlite3.SQLITE_IOERR_SHMSIZE)
    return False


def _storage_error(exc: sqlite3.Error) -> bool:
    """An I/O or space problem: the file may be fine, so it must not be quarantined."""
    code = getattr(exc, "sqlite_errorcode", None)
    return is_disk_full(exc) or (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR)


def _create_private(path: Path) -> None:
    """Create ``path`` mode 0600 (SQLite gives its -wal/-shm files the same mode)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


def _allocate(fd: int, size: int) -> None:
    """Give ``fd`` ``size`` bytes of real blocks (not a sparse file that frees nothing)."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    zeros = bytes(64 * 1024)
    done = 0
    while done < size:
        done += os.write(fd, zeros[:size - done])


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i:i + _CHUNK]


class Spool:
    """The on-disk spool; thread-safe (the app appends, the publisher reads and acks)."""

    def __init__(self, path: Path | str, *, max_messages: int = 50_000,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_age_s: float | None = None,
                 reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                 metrics: Metrics | None = None) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be > 0 (or None for no age limit)")
        if reserve_bytes < 0:
            raise ValueError("reserve_bytes must be >= 0")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.reserve_bytes = reserve_bytes
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self.metrics = metrics or default_metrics()
        self._lock = threading.Lock()
        self._db = self._open()
        page = self._page = int(self._db.execute("PRAGMA page_size").fetchone()[0])
        if reserve_bytes:
            # Bound what a checkpoint may add to the file by what the reserve frees
            # (for the 4 MiB default this is about SQLite's own 1000 pages).
            pages = max(8, (reserve_bytes - _TXN_MARGIN) // page)
            self._db.execute(f"PRAGMA wal_autocheckpoint={pages}")
        count, size = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM({_SIZE}), 0) "
                                       "FROM spool").fetchone()
        self._count = int(count)  # rows in the table, including _deferred ones
        self._bytes = int(size)
        self._deferred: dict[int, int] = {}  # acked, DELETE not committed yet: id -> size
        self._unsaved_dropped = 0  # dropped while the meta row could not be written
        self._tight: int | None = None  # the byte cap while the disk is full
        self._reserve_tried = 0.0
        self._ensure_reserve()

    # -- opening ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        _create_private(self.path)
        db = connect(self.path, wal=True, timeout=5.0, autocommit=True, check_same_thread=False)
        try:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            # A newer spool (an agent slot rolled back to older code) is read as it is:
            # the query below checks that the columns this code needs are there.
            migrate(db, MIGRATIONS, what="the telemetry spool has schema", allow_newer=True)
            db.execute("SELECT id, topic, payload, created FROM spool LIMIT 1").fetchall()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc) and self._release_reserve():
                return self._open()  # the -shm and WAL files needed a little room
            if _storage_error(exc):
                raise  # the file may be fine; quarantining it would lose what it holds
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

    # -- the disk reserve ------------------------------------------------------------------
    def _ensure_reserve(self) -> bool:
        """Make sure the reserve file holds ``reserve_bytes`` of real blocks."""
        if not self.reserve_bytes:
            return True
        self._reserve_tried = time.monotonic()
        try:
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        except OSError:
            return False
        try:
            fd = os.open(self.reserve_path, os.O_CREAT | os.O_WRONLY, 0o600)
            try:
                _allocate(fd, self.reserve_bytes)
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.reserve_path.unlink()
            if not is_disk_full(exc):
                log.warning("cannot create the spool reserve %s: %s", self.reserve_path, exc)
            return False

    def _release_reserve(self) -> bool:
        """Delete the reserve; True only if it was there and is gone now."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot release the spool reserve %s: %s", self.reserve_path, exc)
            return False
        self.metrics.inc("telemetry_spool_reserve_released")
        return True

    def _check_space(self) -> None:
        """While the disk is full: lift the tight cap once there is room again."""
        if self._tight is None:
            # At most one look (a stat) per _RESERVE_RETRY_S: _ensure_reserve restarts the
            # clock and returns at once when the reserve is whole.
            if (self.reserve_bytes
                    and time.monotonic() - self._reserve_tried > _RESERVE_RETRY_S):
                self._ensure_reserve()
            return
        try:
            free = shutil.disk_usage(self.path.parent).free
        except OSError:
            return
        if free < 2 * self.reserve_bytes + _ROOM_PAGES * self._page or not self._ensure_reserve():
            return
        log.info("telemetry spool: disk space is back, byte cap back to %d", self.max_bytes)
        self.metrics.inc("telemetry_spool_disk_recovered")
        self._tight = None

    # -- writing ---------------------------------------------------------------------------
    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite rolls back by itself after some errors
            self._db.execute("ROLLBACK")

    def _lose(self, n: int) -> None:
        """Count ``n`` messages dropped outside a committed transaction."""
        self._unsaved_dropped += n
        self.metrics.inc("telemetry_spool_dropped", n)

    def _sizes(self, ids: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for part in _chunks(ids):
            marks = ",".join("?" * len(part))
            out.update((int(i), int(s)) for i, s in self._db.execute(
                f"SELECT id, {_SIZE} FROM spool WHERE id IN ({marks})", part))
        return out

    def _delete_ids(self, ids: list[int]) -> tuple[int, int]:
        """DELETE these rows (inside a transaction); returns (rows, bytes) removed.

        One statement per chunk: RETURNING (SQLite 3.35+) gives the sizes of the rows
        really deleted, so ids already gone count for nothing.
        """
        n = size = 0
        for part in _chunks(ids):
            marks = ",".join("?" * len(part))
            gone = self._db.execute(f"DELETE FROM spool WHERE id IN ({marks}) "
                                    f"RETURNING {_SIZE}", part).fetchall()
            n, size = n + len(gone), size + sum(int(s) for s, in gone)
        return n, size

    def _evict(self, rows: int, nbytes: int, cutoff: float | None) -> tuple[int, int, int]:
        """Delete the oldest rows until ``rows`` and ``nbytes`` are freed and none is older
        than ``cutoff``; returns (rows, bytes, rows that were only too old)."""
        if rows <= 0 and nbytes <= 0 and cutoff is None:
            return 0, 0, 0
        n = size = expired = 0
        last: int | None = None
        cur = self._db.execute(f"SELECT id, {_SIZE}, created FROM spool ORDER BY id")
        try:
            for rid, rsize, created in cur:
                if n >= rows and size >= nbytes:
                    if cutoff is None or created >= cutoff:
                        break
                    expired += 1
                n, size, last = n + 1, size + int(rsize), int(rid)
        finally:
            cur.close()
        if last is not None:
            self._db.execute("DELETE FROM spool WHERE id <= ?", (last,))
        return n, size, expired

    def _insert(self, topic: str, payload: bytes, size: int, room: int) -> int:
        """One transaction: pending acks, drop-oldest for every bound, the new row."""
        db = self._db
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            acked_n, acked_b = self._delete_ids(list(self._deferred)) if self._deferred \
                else (0, 0)
            live_n, live_b = self._count - acked_n, self._bytes - acked_b
            cap = self.max_bytes if self._tight is None else min(self._tight, self.max_bytes)
            cutoff = None if self.max_age_s is None else now - self.max_age_s
            gone_n, gone_b, expired = self._evict(live_n + 1 - self.max_messages,
                                                  max(live_b + size - cap, room), cutoff)
            lost = gone_n + self._unsaved_dropped
            if lost:
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (lost,))
            cur = db.execute("INSERT INTO spool (topic, payload, created) VALUES (?, ?, ?)",
                             (topic, payload, now))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        self._deferred.clear()
        self._unsaved_dropped = 0
        self._count = live_n - gone_n + 1
        self._bytes = live_b - gone_b + size
        if gone_n:
            self.metrics.inc("telemetry_spool_dropped", gone_n)
        if expired:
            self.metrics.inc("telemetry_spool_expired", expired)
        return int(cur.lastrowid or 0)

    def _checkpoint(self) -> None:
        """Copy the WAL into the database so the next write reuses the WAL's space."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            if not is_disk_full(exc):
                raise

    def append(self, topic: str, payload: bytes) -> int:
        """Store one message (committed before returning) and return its id.

        Drops the oldest messages when a bound is reached. Returns 0 when the message
        itself had to be dropped (larger than ``max_bytes``, or the disk is full and
        dropping old messages did not make room); a full disk never raises.
        """
        size = len(topic.encode()) + len(payload)
        with self._lock:
            self._check_space()
            if size > self.max_bytes:
                self._lose(1)
                return 0
            try:
                return self._insert(topic, payload, size, room=0)  # rolls back on error
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc):
                    raise
            # The disk is full: room from the reserve and the oldest messages, one retry.
            if self._tight is None:
                log.warning("telemetry spool: disk full at %d bytes spooled; dropping the "
                            "oldest messages until space comes back", self._bytes)
            self._release_reserve()
            self.metrics.inc("telemetry_spool_disk_full_retries")
            try:
                self._checkpoint()
                rid = self._insert(topic, payload, size, room=size + _ROOM_PAGES * self._page)
            except (sqlite3.Error, OSError) as exc:
                if not is_disk_full(exc):
                    raise
                self._lose(1)
                self.metrics.inc("telemetry_spool_disk_full")
                rid = 0
            self._tight = self._bytes - sum(self._deferred.values())
            return rid

    # -- reading and acknowledging ---------------------------------------------------------
    def pending(self, after_id: int, limit: int) -> list[Row]:
        """Up to ``limit`` unacknowledged messages with id > ``after_id``, oldest first."""
        out: list[Row] = []
        with self._lock:
            while len(out) < limit:
                want = limit - len(out)
                rows = self._db.execute(
                    "SELECT id, topic, payload FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, want)).fetchall()
                out.extend((int(i), str(t), bytes(p)) for i, t, p in rows
                           if i not in self._deferred)
                if len(rows) < want:
                    break  # the end of the spool (the usual case: one query)
                after_id = int(rows[-1][0])
        return out

    def ack(self, ids: Iterable[int]) -> None:
        """Delete acknowledged messages (ids already gone are ignored).

        On a full disk the ids are remembered and deleted by the next write that works.
        """
        with self._lock:
            batch = [i for i in dict.fromkeys(ids) if i not in self._deferred]
            if not batch and not self._deferred and not self._unsaved_dropped:
                return
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                n, size = self._delete_ids([*self._deferred, *batch])
                if self._unsaved_dropped:
                    db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'",
                               (self._unsaved_dropped,))
                db.execute("COMMIT")
            except BaseException as exc:
                self._rollback()
                if not is_disk_full(exc):
                    raise
                later = self._sizes(batch)
                self._deferred.update(later)
                self.metrics.inc("telemetry_spool_ack_deferred", len(later))
                return
            self._deferred.clear()
            self._unsaved_dropped = 0
            self._count -= n
            self._bytes -= size

    def count(self) -> int:
        """Messages waiting for a PUBACK."""
        with self._lock:
            return self._count - len(self._deferred)

    def nbytes(self) -> int:
        """Bytes (topic + payload) of the messages waiting for a PUBACK."""
        with self._lock:
            return self._bytes - sum(self._deferred.values())

    def dropped(self) -> int:
        """Messages dropped by the bounds or a full disk since the spool file was created."""
        with self._lock:
            return self._unsaved_dropped + int(self._db.execute(
                "SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])

    def close(self) -> None:
        """Close the database (a WAL checkpoint happens here); pending deletes are tried."""
        with contextlib.suppress(sqlite3.Error):
            self.ack([])
        with self._lock:
            self._db.close()


def spooled_count(path: Path | str) -> int:
    """Messages waiting in the spool file at ``path``, read without changing it (0: none).

    For a spool whose agent has stopped (the demo's report): opened read-only, so a
    reader never migrates, checkpoints or creates the owner's file.
    """
    if not Path(path).exists():
        return 0
    db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
    finally:
        db.close()


class MemorySpool:
    """The same interface in memory: no durability (the benchmark's no-spool baseline)."""

    def __init__(self, max_messages: int = 1_000_000, metrics: Metrics | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.metrics = metrics or default_metrics()
        self._rows: collections.OrderedDict[int, tuple[str, bytes]] = collections.OrderedDict()
        self._next = 1
        self._dropped = 0
        self._bytes = 0
        self._lock = threading.Lock()

    def append(self, topic: str, payload: bytes) -> int:
        """Queue one message in memory; drop the oldest when full (0: it was dropped)."""
        size = len(topic.encode()) + len(payload)
        with self._lock:
            if size > self.max_bytes:
                self._dropped += 1
                self.metrics.inc("telemetry_spool_dropped")
                return 0
            while self._rows and (len(self._rows) >= self.max_messages
                                  or self._bytes + size > self.max_bytes):
                _, (t, p) = self._rows.popitem(last=False)
                self._bytes -= len(t.encode()) + len(p)
                self._dropped += 1
                self.metrics.inc("telemetry_spool_dropped")
            i = self._next
            self._next += 1
            self._rows[i] = (topic, payload)
            self._bytes += size
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
                row = self._rows.pop(i, None)
                if row is not None:
                    self._bytes -= len(row[0].encode()) + len(row[1])

    def count(self) -> int:
        """Messages waiting for a PUBACK."""
        return len(self._rows)

    def nbytes(self) -> int:
        """Bytes (topic + payload) of the queued messages."""
        return self._bytes

    def dropped(self) -> int:
        """Messages dropped because the queue was full."""
        return self._dropped

    def close(self) -> None:
        """Nothing to close."""
