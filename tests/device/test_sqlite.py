"""One migration mechanism for every SQLite database; old files still open."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from edgefleet.device.core.sqlite import SchemaTooNew, connect, migrate, schema_version
from edgefleet.device.telemetry import spool as spool_mod
from edgefleet.device.telemetry.spool import Spool

V1 = [["CREATE TABLE IF NOT EXISTS things (id INTEGER PRIMARY KEY, name TEXT NOT NULL)"]]
V2 = [*V1, ["ALTER TABLE things ADD COLUMN size INTEGER NOT NULL DEFAULT 0",
            "CREATE INDEX things_name ON things (name)"]]


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.parametrize("autocommit", [True, False])
def test_fresh_database_gets_every_version_recorded(tmp_path: Path, autocommit: bool) -> None:
    with closing(connect(tmp_path / "a.db", wal=True, autocommit=autocommit)) as db:
        assert migrate(db, V2, what="a.db has schema") == 2
        assert {"things", "schema_migrations"} <= _tables(db)
        assert [r[0] for r in db.execute("SELECT version FROM schema_migrations")] == [1, 2]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert not db.in_transaction


def test_old_database_is_upgraded_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    with closing(sqlite3.connect(path)) as old, old:  # written before versions existed
        old.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
        old.execute("INSERT INTO things (name) VALUES ('kept')")
    with closing(connect(path)) as db:
        assert schema_version(db) == 0
        assert migrate(db, V2, what="a.db has schema") == 2
        assert db.execute("SELECT name, size FROM things").fetchall() == [("kept", 0)]


def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "a.db")) as db:
        migrate(db, V1, what="x")
        assert migrate(db, V2, what="x") == 2
        assert migrate(db, V2, what="x") == 2
        assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == 2


def test_a_failing_step_rolls_back_and_keeps_the_version(tmp_path: Path) -> None:
    bad = [*V1, ["CREATE TABLE half (x INTEGER)", "INSERT INTO things (nope) VALUES (1)"]]
    with closing(connect(tmp_path / "a.db", autocommit=True)) as db:
        assert migrate(db, V1, what="x") == 1
        with pytest.raises(sqlite3.OperationalError):
            migrate(db, bad, what="x")
        assert not db.in_transaction
        assert schema_version(db) == 1
        assert "half" not in _tables(db)  # the step's first statement is undone too


def test_a_newer_database_is_refused_or_left_alone(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "a.db")) as db:
        migrate(db, V2, what="a.db has schema")
        with pytest.raises(SchemaTooNew, match=r"a.db has schema v2, newer than this "
                                                r"edgefleet \(v1\)"):
            migrate(db, V1, what="a.db has schema")
        assert migrate(db, V1, what="a.db has schema", allow_newer=True) == 2
        assert not db.in_transaction


def test_a_separate_table_keeps_a_second_owners_versions(tmp_path: Path) -> None:
    with closing(connect(tmp_path / "a.db")) as db:
        migrate(db, V2, what="x")
        other = [["CREATE TABLE IF NOT EXISTS others (id INTEGER)"]]
        assert migrate(db, other, what="y", table="other_migrations") == 1
        assert schema_version(db) == 2 and schema_version(db, "other_migrations") == 1


# The spool schema as the previous edgefleet created it (no version table).
OLD_SPOOL = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('dropped', 0);
"""


def test_a_spool_written_by_the_previous_code_opens_with_its_messages(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-spool.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(OLD_SPOOL)
        old.execute("INSERT INTO spool (topic, payload, created) VALUES ('t/a', x'01', 1.0)")
        old.execute("INSERT INTO spool (topic, payload, created) VALUES ('t/b', x'0203', 2.0)")
        old.execute("UPDATE meta SET value = 7 WHERE key = 'dropped'")
    sp = Spool(path, reserve_bytes=0)
    try:
        assert sp.count() == 2 and sp.dropped() == 7
        assert sp.pending(0, 10) == [(1, "t/a", b"\x01"), (2, "t/b", b"\x02\x03")]
        sp.ack([1])
        assert sp.append("t/c", b"x") == 3
    finally:
        sp.close()
    assert not list(tmp_path.glob("*.corrupt-*"))  # adopted, not quarantined
    with closing(sqlite3.connect(path)) as db:
        assert schema_version(db) == len(spool_mod.MIGRATIONS)
    sp = Spool(path, reserve_bytes=0)  # and it opens again as it is
    try:
        assert [r[0] for r in sp.pending(0, 10)] == [2, 3] and sp.dropped() == 7
    finally:
        sp.close()


def test_a_newer_spool_is_read_not_refused(tmp_path: Path) -> None:
    """An agent slot rolled back to older code keeps using the spool it finds."""
    path = tmp_path / "telemetry-spool.db"
    Spool(path, reserve_bytes=0).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO schema_migrations VALUES (?, 0)",
                   (len(spool_mod.MIGRATIONS) + 1,))
    sp = Spool(path, reserve_bytes=0)
    try:
        assert sp.append("t", b"p") == 1 and sp.count() == 1
    finally:
        sp.close()
