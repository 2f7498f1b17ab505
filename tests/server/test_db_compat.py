"""Server databases written by the previous edgefleet open with the shared migrations."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from edgefleet.device.core.sqlite import schema_version
from edgefleet.server.fl import store as fl_store
from edgefleet.server.fl.store import FlStore
from edgefleet.server.fleet import devices as fleet_devices
from edgefleet.server.fleet.devices import DeviceTable
from edgefleet.server.registry import repository
from edgefleet.server.retrain import policy
from edgefleet.server.retrain.policy import Approvals
from edgefleet.server.telemetry.store import MIGRATIONS, Store


def test_a_fleet_store_written_by_the_previous_code_opens(tmp_path: Path) -> None:
    """The fleet store recorded versions before: same table, same rows, nothing re-run."""
    path = tmp_path / "fleet.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("BEGIN")
        old.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)")
        for stmt in MIGRATIONS[0]:
            old.execute(stmt.replace("{PK}", "INTEGER PRIMARY KEY AUTOINCREMENT"))
        old.execute("INSERT INTO schema_migrations VALUES (1, 1700000000.0)")
        old.execute("INSERT INTO messages (device, boot, seq, kind, ts, received, payload) "
                    "VALUES ('d1', 'b1', 1, 'metrics', 1.0, 1.0, '{}')")
        old.execute("INSERT INTO devices (device, messages) VALUES ('d1', 1)")
        old.execute("COMMIT")
    st = Store(path)
    try:
        assert st.migrate() == len(MIGRATIONS)
        assert [d["device"] for d in st.devices()] == ["d1"]
        assert st.message_stats() == {"rows": 1, "distinct": 1}
        with st.transaction():
            assert not st.insert_message("d1", "b1", 1, "metrics", 1.0, 2.0, "{}")
        rows = st.query("SELECT version, applied FROM schema_migrations ORDER BY version")
        assert rows[0] == (1, 1700000000.0)  # the old record kept as it was
        assert [v for v, _ in rows] == list(range(1, len(MIGRATIONS) + 1))  # the new ones ran
        assert st.quarantined() == []  # migration 2: the quarantine table
    finally:
        st.close()


def test_server_databases_from_before_versions_are_adopted(tmp_path: Path) -> None:
    # devices.db, fl.db, retrain.db and registry.db as the previous code created them.
    devices_db = tmp_path / "devices.db"
    with closing(sqlite3.connect(devices_db)) as db, db:
        db.execute("CREATE TABLE devices (name TEXT PRIMARY KEY, grp TEXT NOT NULL, "
                   "mqtt_username TEXT NOT NULL, mqtt_hash TEXT NOT NULL, "
                   "enrolled_at REAL NOT NULL, revoked_at REAL, node_public_key TEXT, "
                   "node_id TEXT, fl_state TEXT NOT NULL DEFAULT 'none')")
        db.execute("INSERT INTO devices (name, grp, mqtt_username, mqtt_hash, enrolled_at) "
                   "VALUES ('dev1', 'g', 'dev1', 'h', 1.0)")
    assert [r.name for r in DeviceTable(devices_db).all()] == ["dev1"]

    fl_db = tmp_path / "fl.db"
    with closing(sqlite3.connect(fl_db)) as db, db:
        db.execute("CREATE TABLE fl_runs (tag TEXT PRIMARY KEY, flower_run_id TEXT, "
                   "started TEXT, finished TEXT, status TEXT NOT NULL, params TEXT NOT NULL, "
                   "final TEXT, error TEXT)")
        db.execute("INSERT INTO fl_runs (tag, status, params) VALUES ('r1', 'done', '{}')")
    run = FlStore(fl_db).run("r1")  # the two tables it lacked are created
    assert run is not None and run.status == "done"
    assert FlStore(fl_db).rounds("r1") == []

    retrain_db = tmp_path / "retrain.db"
    with closing(sqlite3.connect(retrain_db)) as db, db:
        db.execute("CREATE TABLE approvals (id TEXT PRIMARY KEY, grp TEXT NOT NULL, "
                   "created REAL NOT NULL, status TEXT NOT NULL, decided REAL, actor TEXT, "
                   "details TEXT)")
        db.execute("INSERT INTO approvals VALUES ('a1', 'g', 1.0, 'pending', NULL, NULL, "
                   "'{}')")
    approvals = Approvals(retrain_db)
    assert [r["id"] for r in approvals.rows()] == ["a1"]
    approvals.db.close()

    for path, mod, table in ((devices_db, fleet_devices, "schema_migrations"),
                             (fl_db, fl_store, "schema_migrations"),
                             (retrain_db, policy, "schema_migrations")):
        with closing(sqlite3.connect(path)) as db:
            assert schema_version(db, table) == len(mod.MIGRATIONS), path


def test_registry_db_keeps_model_and_rollout_versions_apart(tmp_path: Path) -> None:
    home = tmp_path / "registry"
    reg = repository.Registry(home)
    reg.close()
    reg = repository.Registry(home)  # reopening applies nothing again
    reg.close()
    with closing(sqlite3.connect(home / "registry.db")) as db:
        assert schema_version(db, "registry_migrations") == len(repository.MIGRATIONS)
        assert db.execute("SELECT COUNT(*) FROM registry_migrations").fetchone()[0] == len(
            repository.MIGRATIONS)
        assert schema_version(db) == 0  # no generic table in a file with two owners


def test_registry_db_of_version_1_reads_its_rows_as_unencrypted(tmp_path: Path) -> None:
    home = tmp_path / "registry"
    home.mkdir()
    with closing(sqlite3.connect(home / "registry.db")) as db, db:
        for stmt in repository.MIGRATIONS[0]:
            db.execute(stmt)
        db.execute("INSERT INTO model_versions VALUES ('m','1.0.0','digits','ab',1,'m/1.0.0.tar',"
                   "'2024-01-01',0,'{}','{}',0)")
    reg = repository.Registry(home)  # adopts the table, adds the encryption columns
    try:
        rec = reg.require("m", "1.0.0")
        assert rec.content_sha256 == "ab" and rec.encrypted_for == () and not rec.encrypted
    finally:
        reg.close()
