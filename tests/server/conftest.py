"""Fixtures of the server tests: the fleet store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.telemetry.store import Store, open_store
from tests.support.postgres import postgres_server

#: Every table of the fleet store that holds data (the PostgreSQL store is emptied
#: before each test that uses it; the schema's own bookkeeping stays).
STORE_TABLES = ("messages", "messages_hourly", "devices", "events", "open_alerts", "rejects",
                "quarantine")


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with postgres_server() as dsn:
        yield dsn


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty store, once on SQLite and once on PostgreSQL (slow)."""
    if request.param == "sqlite":
        s = open_store(tmp_path / "fleet.db")
    else:
        s = open_store(request.getfixturevalue("pg_dsn"))
        for table in STORE_TABLES:
            s.execute(f"DELETE FROM {table}")
    yield s
    s.close()
