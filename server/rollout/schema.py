"""``rollouts.db``: the rollout package's own database, and the only code that opens it.

The rollout tables used to live in the registry's ``registry.db``, written by two
owners with two transaction styles. A file of their own is the simpler correct split:
the registry (:mod:`edgefleet.server.registry.repository`) owns ``registry.db`` and knows
nothing of rollouts; this module owns ``rollouts.db``, its migrations and the one-time
move of the rows an older registry still holds (:func:`connect`).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edgefleet.device.core import sqlite
from edgefleet.device.core.errors import EdgefleetError

__all__ = ["DB_NAME", "MIGRATIONS", "connect", "migrate", "move_legacy_rows"]

#: The file in the registry home (next to ``registry.db``).
DB_NAME = "rollouts.db"
_LEGACY_DB = "registry.db"
_TABLES = ("rollout_devices", "rollouts", "rollout_migrations")

#: Numbered schema changes of the rollout tables, applied in order in one transaction and
#: recorded in ``rollout_migrations`` (:func:`edgefleet.device.core.sqlite.migrate`).
#: Version 1 is the table that existed before migrations, hence ``IF NOT EXISTS``.
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
    [  # 3: the director's last signed assignment per device (seq floor, re-signing)
        """CREATE TABLE director_assignments (
            device TEXT PRIMARY KEY, seq INTEGER NOT NULL, assignment TEXT,
            expires INTEGER NOT NULL, signed REAL NOT NULL)""",
    ],
]


def migrate(db: sqlite3.Connection) -> int:
    """Apply the rollout migrations ``db`` has not seen; returns the version."""
    return sqlite.migrate(db, MIGRATIONS, table="rollout_migrations",
                          what=f"{DB_NAME} has rollout schema")


def connect(home: Path) -> sqlite3.Connection:
    """``<home>/rollouts.db`` in autocommit mode (transactions explicit), migrated, with
    any rollout rows of ``<home>/registry.db`` moved in."""
    db = sqlite3.connect(Path(home) / DB_NAME, timeout=30, isolation_level=None)
    try:
        migrate(db)
        move_legacy_rows(db, Path(home) / _LEGACY_DB)
    except BaseException:
        db.close()
        raise
    return db


def _legacy_tables(db: sqlite3.Connection) -> set[str]:
    marks = ",".join("?" * len(_TABLES))
    return {r[0] for r in db.execute("SELECT name FROM legacy.sqlite_master WHERE type = "
                                     f"'table' AND name IN ({marks})", _TABLES)}


def move_legacy_rows(db: sqlite3.Connection, legacy: Path) -> int:
    """Move the rollout tables' rows out of an older ``registry.db``; returns rollouts moved.

    One transaction over both files (SQLite commits attached databases atomically), so
    the rows are in exactly one of them at any time; once moved, the old tables are
    dropped and later calls only look. ``INSERT OR IGNORE`` keeps a concurrent second
    mover harmless.
    """
    if not legacy.is_file():
        return 0
    db.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
    try:
        if not _legacy_tables(db):
            return 0
        db.execute("BEGIN IMMEDIATE")
        try:
            have = _legacy_tables(db)
            if "rollout_migrations" in have:
                old = db.execute("SELECT MAX(version) FROM legacy.rollout_migrations"
                                 ).fetchone()[0] or 0
                if old > len(MIGRATIONS):
                    raise EdgefleetError(f"{legacy} has rollout schema v{old}, newer than "
                                         f"this edgefleet (v{len(MIGRATIONS)}): upgrade "
                                         "edgefleet")
            moved = 0
            if "rollouts" in have:
                moved = db.execute("INSERT OR IGNORE INTO main.rollouts "
                                   "SELECT * FROM legacy.rollouts").rowcount
            if "rollout_devices" in have:
                db.execute("INSERT OR IGNORE INTO main.rollout_devices "
                           "SELECT * FROM legacy.rollout_devices")
            for table in _TABLES:
                db.execute(f"DROP TABLE IF EXISTS legacy.{table}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return moved
    finally:
        db.execute("DETACH DATABASE legacy")
