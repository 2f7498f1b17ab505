"""The rollout tables in ``registry.db``: their numbered migrations and the connection."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgefleet.server.telemetry.store import apply_migrations

__all__ = ["DB_NAME", "MIGRATIONS", "connect", "migrate"]

#: The file in the registry home.
DB_NAME = "registry.db"

#: Numbered schema changes of the rollout tables, applied in order in one transaction and
#: recorded in ``rollout_migrations`` (the store's scheme and helper,
#: :func:`~edgefleet.server.telemetry.store.apply_migrations`). Version 1 is the table that
#: existed before migrations, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: rollouts
        """CREATE TABLE IF NOT EXISTS rollouts (
            id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL,
            mode TEXT NOT NULL, devices TEXT NOT NULL, baseline TEXT NOT NULL, grp TEXT,
            shadow INTEGER NOT NULL, threshold REAL NOT NULL, status TEXT NOT NULL,
            reason TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
    ],
    [  # 2: per (rollout, device): store counters at the rollout's start, candidate seen
        """CREATE TABLE rollout_devices (
            rollout TEXT NOT NULL, device TEXT NOT NULL, boot TEXT,
            inferences INTEGER, errors INTEGER, degraded INTEGER, fallback INTEGER,
            recorded REAL, on_candidate REAL, PRIMARY KEY (rollout, device))""",
        "CREATE INDEX rollouts_status ON rollouts (status)",
    ],
]


def migrate(db: sqlite3.Connection) -> int:
    """Apply the rollout migrations ``db`` (autocommit mode) has not seen; returns the version."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = apply_migrations(db.execute, lambda sql: db.execute(sql).fetchone()[0],
                                   "rollout_migrations", MIGRATIONS,
                                   f"{DB_NAME} has rollout schema")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return version


def connect(home: Path) -> sqlite3.Connection:
    """``<home>/registry.db`` in autocommit mode (transactions explicit), migrated."""
    db = sqlite3.connect(Path(home) / DB_NAME, timeout=30, isolation_level=None)
    try:
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db
