"""SQLite for every edgefleet database: one way to connect, one way to change a schema.

Each database has one owning module, which holds its ``MIGRATIONS``: a list of steps,
each a list of SQL statements; step *n* brings the schema to version *n*. The versions
applied are recorded in a table of the database (``schema_migrations`` unless two
owners share a file), one row per version with the time it was applied.

:func:`migrate` applies the steps a database has not seen, inside one ``BEGIN
IMMEDIATE`` transaction: a failing step leaves the database as it was, version
included. A database newer than the code (a version above ``len(migrations)``) is
refused, or, with ``allow_newer``, left alone. Version 1 of a database that existed
before it had migrations uses ``IF NOT EXISTS`` so that such a file is adopted as it is.

:func:`apply_migrations` is the same algorithm over any DB-API connection: the fleet
store runs it on PostgreSQL too, inside its own transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgefleet.device.core.errors import EdgefleetError

__all__ = ["Migrations", "SchemaTooNew", "apply_migrations", "connect", "migrate",
           "schema_version"]

#: Numbered schema changes: ``migrations[n - 1]`` is the list of statements of version n.
Migrations = Sequence[Sequence[str]]

DEFAULT_TABLE = "schema_migrations"


class SchemaTooNew(EdgefleetError):
    """The database was written by a newer edgefleet than this one."""


def connect(path: Path | str, *, wal: bool = False, timeout: float = 30.0,
            autocommit: bool = False, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open ``path``.

    ``wal``: the project's pragmas for a database written while others read it
    (``journal_mode=WAL``, ``synchronous=NORMAL``). ``autocommit``: no implicit
    transactions (``isolation_level=None``); the caller writes ``BEGIN`` itself.
    ``timeout``: how long to wait for another connection's lock.
    """
    db = sqlite3.connect(path, timeout=timeout, check_same_thread=check_same_thread,
                         isolation_level=None if autocommit else "DEFERRED")
    if wal:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            db.close()
            raise
    return db


def apply_migrations(execute: Callable[[str, Sequence[Any]], object],
                     query_one: Callable[[str], Any], table: str,
                     migrations: Migrations, what: str, *,
                     allow_newer: bool = False) -> int:
    """Apply the numbered ``migrations`` not yet recorded in ``table``; returns the version.

    The caller holds one transaction around it, so a failing step leaves nothing applied.
    ``what`` names the schema in the error a newer database gets (``"the fleet store has
    schema"`` gives "the fleet store has schema v3, newer than ..."); with
    ``allow_newer`` such a database is left as it is and its version returned.
    Statements use ``?`` placeholders and portable types (``DOUBLE PRECISION``).
    """
    execute(f"CREATE TABLE IF NOT EXISTS {table} ("
            "version INTEGER PRIMARY KEY, applied DOUBLE PRECISION NOT NULL)", ())
    have = int(query_one(f"SELECT MAX(version) FROM {table}") or 0)
    if have > len(migrations):
        if allow_newer:
            return have
        raise SchemaTooNew(f"{what} v{have}, newer than this edgefleet "
                           f"(v{len(migrations)}): upgrade edgefleet")
    for version in range(have + 1, len(migrations) + 1):
        for stmt in migrations[version - 1]:
            execute(stmt, ())
        execute(f"INSERT INTO {table} VALUES (?, ?)", (version, time.time()))
    return len(migrations)


def migrate(db: sqlite3.Connection, migrations: Migrations, *, what: str,
            table: str = DEFAULT_TABLE, allow_newer: bool = False) -> int:
    """Bring ``db`` to the newest version in one transaction; returns its version.

    Works on a connection in either transaction mode; ``db`` must not be inside a
    transaction. See :func:`apply_migrations` for ``what`` and ``allow_newer``.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = apply_migrations(db.execute, lambda sql: db.execute(sql).fetchone()[0],
                                   table, migrations, what, allow_newer=allow_newer)
    except BaseException:
        if db.in_transaction:  # SQLite rolls back by itself after some errors
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return version


def schema_version(db: sqlite3.Connection, table: str = DEFAULT_TABLE) -> int:
    """The newest version recorded in ``db`` (0: none, or no migrations table)."""
    try:
        return int(db.execute(f"SELECT MAX(version) FROM {table}").fetchone()[0] or 0)
    except sqlite3.OperationalError:
        return 0
