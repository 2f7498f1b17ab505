"""The enrolled-device table of a fleet home (``devices.db``, SQLite).

Kept apart from the telemetry store on purpose: this table is the source of the broker's
password and ACL files and of SuperLink registrations, so it lives with the fleet's
secrets (mode 0600 in the fleet home) and holds only password *hashes*, never
passwords. The telemetry store's ``devices`` table is what the ingest has *heard*;
this one is who is *allowed*.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.sqlite import connect, migrate

__all__ = ["MIGRATIONS", "DeviceRow", "DeviceTable"]

#: Schema versions of ``devices.db`` (:mod:`edgefleet.device.core.sqlite`); version 1 is
#: the table it had before versions were recorded, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: enrolled devices
        """CREATE TABLE IF NOT EXISTS devices (
            name TEXT PRIMARY KEY,
            grp TEXT NOT NULL,
            mqtt_username TEXT NOT NULL,
            mqtt_hash TEXT NOT NULL,
            enrolled_at REAL NOT NULL,
            revoked_at REAL,
            node_public_key TEXT,
            node_id TEXT,
            fl_state TEXT NOT NULL DEFAULT 'none')""",
    ],
]


@dataclass(frozen=True)
class DeviceRow:
    """One enrolled device.

    ``fl_state``: ``none`` (no SuperLink configured), ``pending`` (key not yet registered),
    ``registered``, ``unregistered`` (revoked on the SuperLink), ``unregister_pending``.
    """

    name: str
    group: str
    mqtt_username: str
    mqtt_hash: str
    enrolled_at: float
    revoked_at: float | None
    node_public_key: str | None
    node_id: int | None
    fl_state: str

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly, without the password hash."""
        d = asdict(self)
        d.pop("mqtt_hash")
        d["active"] = self.active
        return d


class DeviceTable:
    """CRUD over ``devices.db``; one short connection per call (CLI and demo both use it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with closing(connect(path)) as db:
            migrate(db, MIGRATIONS, what="devices.db has schema")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(connect(self.path)) as db, db:
            yield db

    def _rows(self, where: str = "", args: tuple[Any, ...] = ()) -> list[DeviceRow]:
        with self._db() as db:
            cur = db.execute("SELECT name, grp, mqtt_username, mqtt_hash, enrolled_at, "
                             "revoked_at, node_public_key, node_id, fl_state FROM devices "
                             f"{where} ORDER BY name", args)
            return [DeviceRow(name=r[0], group=r[1], mqtt_username=r[2], mqtt_hash=r[3],
                              enrolled_at=r[4], revoked_at=r[5], node_public_key=r[6],
                              node_id=None if r[7] is None else int(r[7]), fl_state=r[8])
                    for r in cur.fetchall()]

    def all(self) -> list[DeviceRow]:
        """Every device, revoked ones included."""
        return self._rows()

    def active(self) -> list[DeviceRow]:
        """Devices that may connect."""
        return self._rows("WHERE revoked_at IS NULL")

    def get(self, name: str) -> DeviceRow | None:
        """One device by name."""
        rows = self._rows("WHERE name = ?", (name,))
        return rows[0] if rows else None

    def put(self, name: str, group: str, mqtt_hash: str, node_public_key: str | None,
            fl_state: str) -> DeviceRow:
        """Insert (or replace a revoked row of the same name) with fresh credentials."""
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO devices (name, grp, mqtt_username, mqtt_hash, "
                       "enrolled_at, revoked_at, node_public_key, node_id, fl_state) "
                       "VALUES (?, ?, ?, ?, ?, NULL, ?, NULL, ?)",
                       (name, group, name, mqtt_hash, time.time(), node_public_key, fl_state))
        row = self.get(name)
        assert row is not None
        return row

    def set_fl(self, name: str, fl_state: str, node_id: int | None = None) -> None:
        """Record the SuperLink side (``node_id`` kept when not given)."""
        with self._db() as db:
            db.execute("UPDATE devices SET fl_state = ?, node_id = COALESCE(?, node_id) "
                       "WHERE name = ?",  # node ids are uint64: stored as text
                       (fl_state, None if node_id is None else str(node_id), name))

    def delete(self, name: str) -> None:
        """Forget a device (an enrollment that failed half-way)."""
        with self._db() as db:
            db.execute("DELETE FROM devices WHERE name = ?", (name,))

    def revoke(self, name: str) -> None:
        """Mark revoked now (the row stays for the audit trail)."""
        with self._db() as db:
            db.execute("UPDATE devices SET revoked_at = ? WHERE name = ?", (time.time(), name))
