"""The fleet store: telemetry messages, device registry, events and reject counts.

SQLite in WAL mode is the embedded default; a ``postgresql://`` DSN selects PostgreSQL
(psycopg 3) behind the same methods. The SQL is written once with ``?`` placeholders and
portable types; the two dialects differ only in the auto-increment key and placeholder.
Schema changes are numbered migrations applied in order inside a transaction and
recorded in ``schema_migrations`` (:func:`edgefleet.device.core.sqlite.apply_migrations`,
on both dialects); a store newer than this code is refused.

Exactly-once: ``messages`` has ``UNIQUE (device, boot, seq)`` and inserts use
``ON CONFLICT DO NOTHING``, so the duplicates QoS 1 delivers are counted, not stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgefleet.device.core.errors import ConfigError, MissingExtraError
from edgefleet.device.core.sqlite import apply_migrations
from edgefleet.device.core.sqlite import connect as sqlite_connect

__all__ = ["MIGRATIONS", "QUARANTINE_PREFIX", "QUARANTINE_ROWS", "Store", "default_db",
           "open_store"]

_PK = "{PK}"
MIGRATIONS: list[list[str]] = [
    [  # 1: the initial schema
        f"""CREATE TABLE messages (
            id {_PK}, device TEXT NOT NULL, boot TEXT NOT NULL, seq BIGINT NOT NULL,
            kind TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
            received DOUBLE PRECISION NOT NULL, payload TEXT NOT NULL,
            UNIQUE (device, boot, seq))""",
        "CREATE INDEX messages_device_ts ON messages (device, ts)",
        """CREATE TABLE devices (
            device TEXT PRIMARY KEY, online INTEGER NOT NULL DEFAULT 0,
            status_ts DOUBLE PRECISION, last_seen DOUBLE PRECISION, boot TEXT,
            model_name TEXT, model_version TEXT, training_state TEXT,
            epsilon DOUBLE PRECISION, n_inferences BIGINT NOT NULL DEFAULT 0,
            n_local BIGINT NOT NULL DEFAULT 0, n_fallback BIGINT NOT NULL DEFAULT 0,
            n_degraded BIGINT NOT NULL DEFAULT 0, drift_input DOUBLE PRECISION,
            drift_confidence DOUBLE PRECISION, spool_dropped BIGINT NOT NULL DEFAULT 0,
            messages BIGINT NOT NULL DEFAULT 0, duplicates BIGINT NOT NULL DEFAULT 0,
            metrics_ts DOUBLE PRECISION, last_metrics TEXT)""",
        f"""CREATE TABLE events (
            id {_PK}, ts DOUBLE PRECISION NOT NULL, device TEXT, kind TEXT NOT NULL,
            severity TEXT NOT NULL, message TEXT NOT NULL, data TEXT)""",
        "CREATE INDEX events_ts ON events (ts)",
        """CREATE TABLE open_alerts (
            device TEXT NOT NULL, kind TEXT NOT NULL, since DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (device, kind))""",
        "CREATE TABLE rejects (reason TEXT PRIMARY KEY, count BIGINT NOT NULL)",
    ],
    [  # 2: refused messages, kept (bounded) for an operator to look at
        f"""CREATE TABLE quarantine (
            id {_PK}, received DOUBLE PRECISION NOT NULL, device TEXT, topic TEXT NOT NULL,
            reason TEXT NOT NULL, detail TEXT NOT NULL, size BIGINT NOT NULL,
            prefix TEXT NOT NULL)""",
        "CREATE INDEX quarantine_device ON quarantine (device)",
    ],
    [  # 3: old telemetry rolled up per device and hour (server/telemetry/retention.py)
        """CREATE TABLE messages_hourly (
            device TEXT NOT NULL, hour DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
            n BIGINT NOT NULL, inferences BIGINT NOT NULL, fallback BIGINT NOT NULL,
            degraded BIGINT NOT NULL,
            latency_p95_sum DOUBLE PRECISION NOT NULL, latency_p95_n BIGINT NOT NULL,
            confidence_p50_sum DOUBLE PRECISION NOT NULL, confidence_p50_n BIGINT NOT NULL,
            drift_input_sum DOUBLE PRECISION NOT NULL, drift_input_n BIGINT NOT NULL,
            PRIMARY KEY (device, hour, kind))""",
        "CREATE INDEX messages_hourly_hour ON messages_hourly (hour)",
    ],
]

#: Create a device's registry row if needed; bump last seen and its message counts.
_TOUCH = ("INSERT INTO devices (device, last_seen, messages, duplicates) VALUES (?, ?, ?, ?) "
          "ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, "
          "messages = devices.messages + excluded.messages, "
          "duplicates = devices.duplicates + excluded.duplicates")

#: Rows per multi-row insert (SQLite allows 32,766 parameters, 7 a row).
_INSERT_CHUNK = 1000
_INSERT_COLS = "device, boot, seq, kind, ts, received, payload"
_INSERT_SQLITE = (f"INSERT INTO messages ({_INSERT_COLS}) VALUES {{values}} "
                  "ON CONFLICT (device, boot, seq) DO NOTHING RETURNING device, boot, seq")
#: PostgreSQL: the rows as seven arrays in binary format (``%b``: psycopg's text format
#: escapes every quote of a JSON payload in Python; binary copies the bytes).
_INSERT_PG = (f"INSERT INTO messages ({_INSERT_COLS}) SELECT * FROM unnest("
              "%b::text[], %b::text[], %b::bigint[], %b::text[], %b::float8[], %b::float8[], "
              "%b::text[]) ON CONFLICT (device, boot, seq) DO NOTHING "
              "RETURNING device, boot, seq")

#: :data:`_TOUCH` over arrays (binary, one round trip); a device at most once per call.
_TOUCH_PG = ("INSERT INTO devices (device, last_seen, messages, duplicates) SELECT * FROM "
             "unnest(%b::text[], %b::float8[], %b::bigint[], %b::bigint[]) "
             + _TOUCH[_TOUCH.index("ON CONFLICT"):])

#: PostgreSQL advisory lock key held while migrating (any constant; "edgeflt" in ASCII).
_MIGRATION_LOCK = 0x65646765666C74

#: Rows the quarantine keeps (the oldest go first); bytes of each payload kept.
QUARANTINE_ROWS = 10_000
QUARANTINE_PREFIX = 256

DEVICE_COLUMNS = ("device", "online", "status_ts", "last_seen", "boot", "model_name",
                  "model_version", "training_state", "epsilon", "n_inferences", "n_local",
                  "n_fallback", "n_degraded", "drift_input", "drift_confidence",
                  "spool_dropped", "messages", "duplicates", "metrics_ts")


def default_db() -> str:
    """``$EDGEFLEET_DB``, else ``$XDG_DATA_HOME/edgefleet/fleet.db``."""
    env = os.environ.get("EDGEFLEET_DB")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "edgefleet" / "fleet.db")


class Store:
    """One connection to the fleet database; methods are safe to call from several threads."""

    def __init__(self, target: str | Path) -> None:
        self.target = str(target)
        self.dialect = "postgresql" if self.target.startswith(
            ("postgresql://", "postgres://")) else "sqlite"
        self._lock = threading.RLock()
        self._conn: Any = self._connect()
        self.migrate()

    # -- connection and SQL --------------------------------------------------------------
    def _connect(self) -> Any:
        if self.dialect == "postgresql":
            try:
                import psycopg
            except ImportError:
                raise MissingExtraError("the PostgreSQL store", "server", "psycopg") from None
            try:
                return psycopg.connect(self.target, autocommit=True)
            except psycopg.Error as exc:
                raise ConfigError(f"cannot connect to PostgreSQL: {exc}".strip()) from None
        path = Path(self.target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            conn = sqlite_connect(path, wal=True, autocommit=True, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the fleet store: {exc}", path=str(path)) from None
        return conn

    def _sql(self, sql: str) -> str:
        if self.dialect == "postgresql":
            return sql.replace("?", "%s").replace(_PK, "BIGSERIAL PRIMARY KEY")
        return sql.replace(_PK, "INTEGER PRIMARY KEY AUTOINCREMENT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        with self._lock:
            cur = self._conn.execute(self._sql(sql), tuple(params))
            return int(cur.rowcount or 0)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a SELECT and return all rows as tuples."""
        with self._lock:
            return [tuple(r) for r in self._conn.execute(self._sql(sql), tuple(params))]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """Everything inside commits together or not at all."""
        with self._lock:
            if self.dialect == "postgresql":
                with self._conn.transaction():
                    yield self
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[Store]:
        """Inside :meth:`transaction`: a part that rolls back alone when it raises, so one
        message that fails its writes never takes the rest of the batch with it."""
        with self._lock:
            self._conn.execute("SAVEPOINT one_message")
            try:
                yield self
            except BaseException:
                self._conn.execute("ROLLBACK TO SAVEPOINT one_message")
                self._conn.execute("RELEASE SAVEPOINT one_message")
                raise
            self._conn.execute("RELEASE SAVEPOINT one_message")

    def migrate(self) -> int:
        """Apply the migrations this database has not seen; returns the schema version."""
        with self.transaction():
            if self.dialect == "postgresql":
                # K ingest workers open one fresh store at once: one migrates, the others
                # wait here and then find it done (SQLite's BEGIN IMMEDIATE does this).
                self.query("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            return apply_migrations(self.execute, lambda sql: self.query(sql)[0][0],
                                    "schema_migrations", MIGRATIONS, "the fleet store has schema")

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    # -- writes (called inside transaction()) -----------------------------------------
    def insert_message(self, device: str, boot: str, seq: int, kind: str, ts: float,
                       received: float, payload: str) -> bool:
        """Store a message once; False when (device, boot, seq) is already there."""
        return self.execute(
            "INSERT INTO messages (device, boot, seq, kind, ts, received, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, boot, seq) DO NOTHING",
            (device, boot, seq, kind, ts, received, payload)) == 1

    def insert_messages(self, rows: Sequence[tuple[str, str, int, str, float, float, str]]
                        ) -> list[bool]:
        """:meth:`insert_message` for many ``(device, boot, seq, kind, ts, received,
        payload)`` rows; which were new. One statement per chunk, not one per row: on
        PostgreSQL the rows travel as arrays (``unnest``), one round trip; on SQLite a
        multi-row ``VALUES``. ``RETURNING`` names the rows inserted; of two rows with one
        key in a batch (a redelivery) only the first counts as new."""
        if not rows:
            return []
        inserted: set[tuple[str, str, int]] = set()
        with self._lock:
            for i in range(0, len(rows), _INSERT_CHUNK):
                chunk = rows[i:i + _INSERT_CHUNK]
                if self.dialect == "postgresql":
                    cols = [list(c) for c in zip(*chunk, strict=True)]
                    cur = self._conn.execute(_INSERT_PG, cols)
                elif sqlite3.sqlite_version_info < (3, 35):  # no RETURNING: row by row
                    inserted.update(r[:3] for r in chunk if self.insert_message(*r))
                    continue
                else:
                    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
                    cur = self._conn.execute(
                        _INSERT_SQLITE.format(values=values),
                        [v for r in chunk for v in r])
                inserted.update((d, b, int(q)) for d, b, q in cur.fetchall())
        new = []
        for r in rows:
            key = (r[0], r[1], int(r[2]))
            new.append(key in inserted)
            inserted.discard(key)  # a second row with this key was a duplicate
        return new

    def open_alert_kinds(self, devices: Sequence[str]) -> dict[str, set[str]]:
        """The open alert kinds of each of ``devices`` (one query per chunk of them)."""
        out: dict[str, set[str]] = {d: set() for d in devices}
        devs = list(out)
        for i in range(0, len(devs), _INSERT_CHUNK):
            chunk = devs[i:i + _INSERT_CHUNK]
            if self.dialect == "postgresql":
                rows = self.query("SELECT device, kind FROM open_alerts WHERE device = ANY(?)",
                                  (chunk,))
            else:
                rows = self.query("SELECT device, kind FROM open_alerts WHERE device IN "
                                  f"({', '.join(['?'] * len(chunk))})", chunk)
            for d, k in rows:
                out[d].add(k)
        return out

    def _many(self, sql: str, rows: Sequence[Sequence[Any]], *, returning: bool) -> list[bool]:
        """One statement over many parameter rows (PostgreSQL: pipelined, one round
        trip); with ``returning``, whether each row's statement returned a row."""
        if self.dialect != "postgresql" or not rows:  # SQLite: in-process, no round trips
            return [self.execute(sql, r) == 1 for r in rows]
        with self._lock:
            cur = self._conn.cursor()
            cur.executemany(self._sql(sql), rows, returning=returning)
            if not returning:
                return [True] * len(rows)
            out = []
            while True:
                out.append(cur.fetchone() is not None)
                if not cur.nextset():
                    break
            return out

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement over many parameter rows (one round trip on PostgreSQL)."""
        self._many(sql, rows, returning=False)

    def touch_devices(self, rows: Sequence[tuple[str, float, int, int]]) -> None:
        """:meth:`touch_device` for many ``(device, seen, new, dup)`` rows at once, each
        device once (PostgreSQL: one statement over arrays)."""
        if not rows:
            return
        with self._lock:
            if self.dialect == "postgresql":
                self._conn.execute(_TOUCH_PG, [list(c) for c in zip(*rows, strict=True)])
            else:  # one C loop over the rows instead of a Python one
                self._conn.executemany(_TOUCH, rows)

    def update_metrics_many(self, rows: Sequence[tuple[str, float, dict[str, Any],
                                                       dict[str, Any] | str]]) -> list[bool]:
        """:meth:`update_metrics` for many ``(device, ts, fields, body)``; which changed.
        The rows must share one set of field names and name each device once; a body
        may come as its JSON text."""
        if not rows:
            return []
        cols = ", ".join(f"{k} = ?" for k in rows[0][2])
        sql = (f"UPDATE devices SET {cols}, metrics_ts = ?, last_metrics = ? "
               "WHERE device = ? AND (metrics_ts IS NULL OR metrics_ts <= ?)")
        params = [(*f.values(), ts, b if isinstance(b, str) else json.dumps(b), d, ts)
                  for d, ts, f, b in rows]
        if self.dialect == "postgresql":
            return self._many(sql + " RETURNING 1", params, returning=True)
        # SQLite: all rows in one C loop, then which took: a row that was written holds
        # its ts now; one that was not holds a newer one (the condition is ``<=``).
        with self._lock:
            self._conn.executemany(sql, params)
            now: dict[str, float] = {}
            devs = [d for d, _ts, _f, _b in rows]
            for i in range(0, len(devs), _INSERT_CHUNK):
                chunk = devs[i:i + _INSERT_CHUNK]
                now.update(self.query("SELECT device, metrics_ts FROM devices WHERE device "
                                      f"IN ({', '.join(['?'] * len(chunk))})", chunk))
        return [now.get(d) == ts for d, ts, _f, _b in rows]

    def touch_device(self, device: str, seen: float, new: int, dup: int) -> None:
        """Create the registry row if needed; bump last seen and message counts."""
        self.execute(_TOUCH, (device, seen, new, dup))

    def set_status(self, device: str, online: bool, ts: float, boot: str) -> None:
        """Online/offline from the status topic."""
        self.execute("INSERT INTO devices (device) VALUES (?) ON CONFLICT (device) DO NOTHING",
                     (device,))
        self.execute("UPDATE devices SET online = ?, status_ts = ?, boot = ? WHERE device = ?",
                     (1 if online else 0, ts, boot, device))

    def update_metrics(self, device: str, ts: float, fields: dict[str, Any],
                       body: dict[str, Any] | str) -> bool:
        """Newest metrics win: an older spooled report never overwrites a newer one."""
        return self.update_metrics_many([(device, ts, fields, body)])[0]

    def add_event(self, ts: float, device: str | None, kind: str, severity: str,
                  message: str, data: dict[str, Any] | None = None) -> None:
        """Append an event (an alert, a resolution, or a device-reported event)."""
        self.execute("INSERT INTO events (ts, device, kind, severity, message, data) "
                     "VALUES (?, ?, ?, ?, ?, ?)",
                     (ts, device, kind, severity, message, json.dumps(data or {})))

    def open_alert(self, device: str, kind: str, ts: float) -> bool:
        """Mark an alert open; False if it already was (so it is written once)."""
        return self.execute("INSERT INTO open_alerts VALUES (?, ?, ?) "
                            "ON CONFLICT (device, kind) DO NOTHING", (device, kind, ts)) == 1

    def close_alert(self, device: str, kind: str) -> bool:
        """Mark an alert resolved; False if it was not open."""
        return self.execute("DELETE FROM open_alerts WHERE device = ? AND kind = ?",
                            (device, kind)) == 1

    def count_rejects(self, counts: dict[str, int]) -> None:
        """Add to the per-reason reject counters."""
        for reason, n in counts.items():
            self.execute("INSERT INTO rejects VALUES (?, ?) ON CONFLICT (reason) "
                         "DO UPDATE SET count = rejects.count + excluded.count", (reason, n))

    def quarantine(self, received: float, device: str | None, topic: str, reason: str,
                   detail: str, payload: bytes, keep: int = QUARANTINE_ROWS) -> None:
        """Keep a refused message's device, topic, reason and the first bytes of its payload
        (escaped, so any bytes are text), dropping the oldest rows beyond ``keep``."""
        prefix = bytes(payload[:QUARANTINE_PREFIX]).decode("utf-8", errors="backslashreplace")
        self.execute("INSERT INTO quarantine (received, device, topic, reason, detail, size, "
                     "prefix) VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (received, device, topic[:512], reason,
                      detail[:500].replace("\x00", "\\x00"), len(payload),
                      prefix.replace("\x00", "\\x00")))  # PostgreSQL text holds no NUL
        self.execute("DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?",
                     (keep,))

    # -- reads ------------------------------------------------------------------------------
    def devices(self, *, with_metrics: bool = False) -> list[dict[str, Any]]:
        """Every registry row, by device id; ``with_metrics`` adds each row's latest
        metrics body as stored, its JSON text (``last_metrics``: parse the rows you use)."""
        cols = (*DEVICE_COLUMNS, "last_metrics") if with_metrics else DEVICE_COLUMNS
        rows = self.query(f"SELECT {', '.join(cols)} FROM devices ORDER BY device")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def device(self, device: str) -> dict[str, Any] | None:
        """One registry row with its latest metrics body, or None."""
        rows = self.query(f"SELECT {', '.join(DEVICE_COLUMNS)}, last_metrics FROM devices "
                          "WHERE device = ?", (device,))
        if not rows:
            return None
        out = dict(zip((*DEVICE_COLUMNS, "last_metrics"), rows[0], strict=True))
        out["last_metrics"] = json.loads(out["last_metrics"]) if out["last_metrics"] else None
        return out

    def messages(self, *, device: str | None = None, after_id: int = 0, limit: int = 100,
                 kind: str | None = None, newest: bool = False) -> list[dict[str, Any]]:
        """Stored messages in arrival order (``newest``: the last ``limit`` of them)."""
        where, params = ["id > ?"], [after_id]
        if device:
            where.append("device = ?")
            params.append(device)  # type: ignore[arg-type]
        if kind:
            where.append("kind = ?")
            params.append(kind)  # type: ignore[arg-type]
        order = "DESC" if newest else "ASC"
        rows = self.query("SELECT id, device, boot, seq, kind, ts, received, payload "
                          f"FROM messages WHERE {' AND '.join(where)} ORDER BY id {order} "
                          "LIMIT ?", (*params, limit))
        keys = ("id", "device", "boot", "seq", "kind", "ts", "received", "payload")
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        return out[::-1] if newest else out

    def last_metrics_message(self, device: str,
                             before: float | None = None) -> dict[str, Any] | None:
        """The device's newest stored ``metrics`` message (sent at or before ``before``)."""
        where = "device = ? AND kind = 'metrics'"
        params: list[Any] = [device]
        if before is not None:
            where += " AND ts <= ?"
            params.append(before)
        rows = self.query(f"SELECT boot, ts, payload FROM messages WHERE {where} "
                          "ORDER BY ts DESC, id DESC LIMIT 1", params)
        return dict(zip(("boot", "ts", "payload"), rows[0], strict=True)) if rows else None

    def message_stats(self, device: str | None = None) -> dict[str, int]:
        """Row count and distinct (device, boot, seq) count (equal unless the schema broke)."""
        where, params = ("WHERE device = ?", (device,)) if device else ("", ())
        n = self.query(f"SELECT COUNT(*) FROM messages {where}", params)[0][0]
        d = self.query("SELECT COUNT(*) FROM (SELECT DISTINCT device, boot, seq FROM messages "
                       f"{where}) AS t", params)[0][0]
        return {"rows": int(n), "distinct": int(d)}

    def events(self, *, limit: int = 50, device: str | None = None,
               prefix: str | None = None) -> list[dict[str, Any]]:
        """The newest events first."""
        where, params = ["1 = 1"], []
        if device:
            where.append("device = ?")
            params.append(device)
        if prefix:
            where.append("kind LIKE ?")
            params.append(prefix + "%")
        rows = self.query("SELECT id, ts, device, kind, severity, message, data FROM events "
                          f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
                          (*params, limit))
        keys = ("id", "ts", "device", "kind", "severity", "message", "data")
        return [{**dict(zip(keys, r, strict=True)), "data": json.loads(r[6] or "{}")}
                for r in rows]

    def open_alerts(self) -> list[dict[str, Any]]:
        """Alerts raised and not yet resolved."""
        return [{"device": d, "kind": k, "since": s} for d, k, s in
                self.query("SELECT device, kind, since FROM open_alerts ORDER BY since")]

    def quarantined(self, *, device: str | None = None, limit: int = 100
                    ) -> list[dict[str, Any]]:
        """The newest quarantined messages first."""
        where, params = ("WHERE device = ?", [device]) if device else ("", [])
        rows = self.query("SELECT id, received, device, topic, reason, detail, size, prefix "
                          f"FROM quarantine {where} ORDER BY id DESC LIMIT ?",
                          (*params, limit))
        keys = ("id", "received", "device", "topic", "reason", "detail", "size", "prefix")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def hourly(self, *, kind: str = "metrics", limit: int = 20_000) -> list[dict[str, Any]]:
        """The newest ``limit`` rolled-up hours of ``kind`` (oldest first), each with its
        message count, summed counters and the mean of each plotted quantity."""
        rows = self.query(
            "SELECT device, hour, n, inferences, fallback, degraded, latency_p95_sum, "
            "latency_p95_n, confidence_p50_sum, confidence_p50_n, drift_input_sum, "
            "drift_input_n FROM messages_hourly WHERE kind = ? ORDER BY hour DESC LIMIT ?",
            (kind, limit))

        def mean(total: float, n: int) -> float | None:
            return float(total) / n if n else None

        return [{"device": r[0], "hour": float(r[1]), "n": int(r[2]),
                 "inferences": int(r[3]), "fallback": int(r[4]), "degraded": int(r[5]),
                 "latency_p95": mean(r[6], r[7]), "confidence_p50": mean(r[8], r[9]),
                 "drift_input": mean(r[10], r[11])} for r in reversed(rows)]

    def rejects(self) -> dict[str, int]:
        """Rejected messages by reason."""
        return {r: int(n) for r, n in self.query("SELECT reason, count FROM rejects")}


def open_store(target: str | Path | None = None) -> Store:
    """Open (and migrate) the store at a path or DSN; default: :func:`default_db`."""
    return Store(target or default_db())
