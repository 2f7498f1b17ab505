"""Federated runs and their per-round metrics in the server's SQLite database.

The ServerApp (a process the SuperLink starts) writes; ``edgefleet train`` reads the
same file to draw its progress bar and print the result, so the two processes share no
memory. WAL mode lets the reader poll while the writer commits.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.sqlite import connect, migrate

__all__ = ["MIGRATIONS", "FlStore", "RoundRow", "RunRow", "declines_by_reason"]

#: Schema versions of the FL database (:mod:`edgefleet.device.core.sqlite`); version 1 is
#: the schema it had before versions were recorded, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: runs, rounds, per-device evaluations
        """CREATE TABLE IF NOT EXISTS fl_runs (
            tag TEXT PRIMARY KEY, flower_run_id TEXT, started TEXT, finished TEXT,
            status TEXT NOT NULL, params TEXT NOT NULL, final TEXT, error TEXT)""",
        """CREATE TABLE IF NOT EXISTS fl_rounds (
            tag TEXT NOT NULL, round INTEGER NOT NULL, accuracy REAL, loss REAL,
            nodes INTEGER, declined INTEGER, failed INTEGER, epsilon REAL,
            fed_accuracy REAL, seconds REAL, bytes_down INTEGER, bytes_up INTEGER,
            PRIMARY KEY (tag, round))""",
        """CREATE TABLE IF NOT EXISTS fl_device_eval (
            tag TEXT NOT NULL, round INTEGER NOT NULL, node TEXT NOT NULL, accuracy REAL,
            examples INTEGER, PRIMARY KEY (tag, round, node))""",
    ],
    [  # 2: declines by reason (budget, policy, ledger) per round, as JSON
        "ALTER TABLE fl_rounds ADD COLUMN declines TEXT",
    ],
]


@dataclass(frozen=True)
class RoundRow:
    """One round: server-side test metrics, who took part, and the privacy spent so far."""

    round: int
    accuracy: float | None
    loss: float | None
    nodes: int
    declined: int
    failed: int
    epsilon: float | None
    fed_accuracy: float | None
    seconds: float | None
    bytes_down: int | None
    bytes_up: int | None
    #: ``declined`` split by reason: ``{"budget": n, "policy": n, "ledger": n}``.
    declines: dict[str, int] | None = None


@dataclass(frozen=True)
class RunRow:
    """A run's status and, once finished, its final summary."""

    tag: str
    flower_run_id: str | None
    status: str
    params: dict[str, Any]
    final: dict[str, Any] | None
    error: str | None


def declines_by_reason(rounds: list[RoundRow]) -> dict[str, int]:
    """Every round's declines summed by reason (``budget``, ``policy``, ``ledger``)."""
    out: dict[str, int] = {}
    for r in rounds:
        for why, n in (r.declines or {}).items():
            out[why] = out.get(why, 0) + int(n)
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class FlStore:
    """Small typed access to the two tables; one short transaction per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(connect(path, wal=True)) as db:
            migrate(db, MIGRATIONS, what=f"{path.name} has FL schema")

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        db = connect(self.path)
        try:
            with db:
                yield db
        finally:
            db.close()

    def start_run(self, tag: str, flower_run_id: str, params: dict[str, Any]) -> None:
        """Register a run (idempotent for a restarted ServerApp: its rounds are replaced)."""
        with self._conn() as db:
            db.execute("DELETE FROM fl_rounds WHERE tag = ?", (tag,))
            db.execute("DELETE FROM fl_device_eval WHERE tag = ?", (tag,))
            db.execute("INSERT OR REPLACE INTO fl_runs (tag, flower_run_id, started, status, "
                       "params) VALUES (?, ?, ?, 'running', ?)",
                       (tag, flower_run_id, _now(), json.dumps(params, sort_keys=True)))

    def add_round(self, tag: str, row: RoundRow) -> None:
        """Store one round's metrics."""
        with self._conn() as db:
            db.execute("INSERT OR REPLACE INTO fl_rounds (tag, round, accuracy, loss, nodes, "
                       "declined, failed, epsilon, fed_accuracy, seconds, bytes_down, "
                       "bytes_up, declines) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (tag, row.round, row.accuracy, row.loss, row.nodes, row.declined,
                        row.failed, row.epsilon, row.fed_accuracy, row.seconds, row.bytes_down,
                        row.bytes_up,
                        None if row.declines is None else json.dumps(row.declines)))

    def add_device_evals(self, tag: str, round_: int,
                         evals: dict[int, tuple[float, int]]) -> None:
        """Store each device's federated-evaluation accuracy (and sample count) of a round."""
        with self._conn() as db:
            db.executemany("INSERT OR REPLACE INTO fl_device_eval VALUES (?,?,?,?,?)",
                           [(tag, round_, str(node), acc, n)
                            for node, (acc, n) in evals.items()])

    def device_evals(self, tag: str) -> dict[int, dict[str, float]]:
        """``{round: {node: accuracy}}`` of a run (node ids as text: they exceed SQLite ints)."""
        with self._conn() as db:
            rows = db.execute("SELECT round, node, accuracy FROM fl_device_eval WHERE tag = ? "
                              "ORDER BY round, node", (tag,)).fetchall()
        out: dict[int, dict[str, float]] = {}
        for r, node, acc in rows:
            out.setdefault(int(r), {})[str(node)] = float(acc)
        return out

    def runs(self, limit: int = 20) -> list[RunRow]:
        """The newest runs first."""
        with self._conn() as db:
            tags = [r[0] for r in db.execute("SELECT tag FROM fl_runs ORDER BY started DESC "
                                             "LIMIT ?", (limit,)).fetchall()]
        return [r for t in tags if (r := self.run(t)) is not None]

    def finish_run(self, tag: str, final: dict[str, Any] | None, error: str | None = None) -> None:
        """Mark a run finished (with its summary) or failed (with the reason)."""
        with self._conn() as db:
            db.execute("UPDATE fl_runs SET finished = ?, status = ?, final = ?, error = ? "
                       "WHERE tag = ?", (_now(), "failed" if error else "finished",
                                         json.dumps(final) if final else None, error, tag))

    def run(self, tag: str) -> RunRow | None:
        """The run called ``tag``, or None if the ServerApp has not registered it yet."""
        with self._conn() as db:
            r = db.execute("SELECT tag, flower_run_id, status, params, final, error FROM fl_runs "
                           "WHERE tag = ?", (tag,)).fetchone()
        if r is None:
            return None
        return RunRow(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]) if r[4] else None, r[5])

    def rounds(self, tag: str) -> list[RoundRow]:
        """Every stored round of ``tag`` in order (round 0 is the initial model)."""
        with self._conn() as db:
            rows = db.execute("SELECT round, accuracy, loss, nodes, declined, failed, epsilon, "
                              "fed_accuracy, seconds, bytes_down, bytes_up, declines "
                              "FROM fl_rounds WHERE tag = ? ORDER BY round", (tag,)).fetchall()
        return [RoundRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                         json.loads(r[11]) if r[11] else None) for r in rows]
