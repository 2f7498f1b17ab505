"""``rollouts.db`` is the rollout package's own; rows an older ``registry.db`` holds move once."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.server.rollout import schema
from edgefleet.server.rollout.health import RolloutLedger
from edgefleet.server.rollout.records import Counts
from edgefleet.server.telemetry.store import apply_migrations

_ROW = ("r1", "digits-mlp", "1.1.0", "canary", '["d1"]', '{"d1": "1.0.0"}', None, 0, 0.2,
        "running", None, 1.0, 2.0)


def _old_registry(home: Path, migrations: int = len(schema.MIGRATIONS)) -> None:
    """A ``registry.db`` as edgefleet wrote it before rollouts had their own file."""
    home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(home / "registry.db")
    db.execute("CREATE TABLE model_versions (name TEXT, version TEXT)")
    db.execute("INSERT INTO model_versions VALUES ('digits-mlp', '1.1.0')")
    apply_migrations(db.execute, lambda sql: db.execute(sql).fetchone()[0],
                     "rollout_migrations", schema.MIGRATIONS[:migrations], "test")
    db.execute("INSERT INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", _ROW)
    if migrations >= 2:
        db.execute("INSERT INTO rollout_devices VALUES ('r1', 'd1', 'b0', 10, 1, 0, 2, 3.0, "
                   "NULL)")
    db.commit()
    db.close()


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.parametrize("migrations", [1, 2])
def test_rollout_rows_move_out_of_registry_db_once(tmp_path: Path, migrations: int) -> None:
    _old_registry(tmp_path, migrations)
    db = schema.connect(tmp_path)
    try:
        assert db.execute("SELECT * FROM rollouts").fetchall() == [_ROW]
        ledger = RolloutLedger(db)
        if migrations >= 2:
            assert ledger.baseline("r1", "d1") == Counts("b0", 10, 1, 0, 2)
        else:
            assert ledger.baseline("r1", "d1") is None
    finally:
        db.close()
    # The registry keeps its own table and nothing of the rollouts.
    assert _tables(tmp_path / "registry.db") == {"model_versions"}
    with sqlite3.connect(tmp_path / "registry.db") as reg:
        assert reg.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0] == 1
    db = schema.connect(tmp_path)  # a second open finds nothing left to move
    try:
        assert len(db.execute("SELECT * FROM rollouts").fetchall()) == 1
    finally:
        db.close()


def test_a_fresh_home_gets_rollouts_db_only(tmp_path: Path) -> None:
    db = schema.connect(tmp_path)
    db.close()
    assert not (tmp_path / "registry.db").exists()
    assert {"rollouts", "rollout_devices", "rollout_migrations"} <= _tables(
        tmp_path / schema.DB_NAME)


def test_a_newer_rollout_schema_in_registry_db_is_not_moved(tmp_path: Path) -> None:
    _old_registry(tmp_path)
    with sqlite3.connect(tmp_path / "registry.db") as reg:
        reg.execute("INSERT INTO rollout_migrations VALUES (99, 0)")
    with pytest.raises(EdgefleetError, match="newer than this edgefleet"):
        schema.connect(tmp_path)
    assert "rollouts" in _tables(tmp_path / "registry.db")  # nothing half-moved
