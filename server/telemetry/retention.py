"""Retention of old telemetry: raw messages roll up into hourly rows, then age out.

A fleet at one message a minute writes 1,440 rows per device and day; kept raw, a week
of 10,000 devices is 100 M rows. ``edgefleet fleet prune`` keeps the raw messages of the
last ``keep_raw`` seconds; older ones are added into ``messages_hourly`` (one row per
device, hour and kind: message count, summed counters, sum and count of each quantity
the report plots, so means stay exact when hours are merged) and deleted. Hourly rows
older than ``keep_hourly`` are deleted.

Each batch is one transaction (roll up, then delete the same ids), so a crash loses
nothing and counts nothing twice, and the ingest's writes wait at most one batch.
Running it again does nothing more: what was rolled up is gone from ``messages``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet.device.core.errors import UsageError
from edgefleet.server.telemetry.store import Store

__all__ = ["PruneResult", "parse_age", "prune"]

HOUR = 3600.0
_UNITS = {"s": 1.0, "m": 60.0, "h": HOUR, "d": 86400.0, "w": 7 * 86400.0}

_UPSERT = (
    "INSERT INTO messages_hourly (device, hour, kind, n, inferences, fallback, degraded, "
    "latency_p95_sum, latency_p95_n, confidence_p50_sum, confidence_p50_n, "
    "drift_input_sum, drift_input_n) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device, hour, kind) DO UPDATE SET "
    "n = messages_hourly.n + excluded.n, "
    "inferences = messages_hourly.inferences + excluded.inferences, "
    "fallback = messages_hourly.fallback + excluded.fallback, "
    "degraded = messages_hourly.degraded + excluded.degraded, "
    "latency_p95_sum = messages_hourly.latency_p95_sum + excluded.latency_p95_sum, "
    "latency_p95_n = messages_hourly.latency_p95_n + excluded.latency_p95_n, "
    "confidence_p50_sum = messages_hourly.confidence_p50_sum + excluded.confidence_p50_sum, "
    "confidence_p50_n = messages_hourly.confidence_p50_n + excluded.confidence_p50_n, "
    "drift_input_sum = messages_hourly.drift_input_sum + excluded.drift_input_sum, "
    "drift_input_n = messages_hourly.drift_input_n + excluded.drift_input_n")

#: Ids per ``DELETE ... IN (...)`` (well below SQLite's bound on parameters).
_IDS_PER_DELETE = 500


@dataclass
class PruneResult:
    """What one prune did."""

    rolled_up: int = 0  # raw messages added into hourly rows and deleted
    batches: int = 0
    hourly_deleted: int = 0  # hourly rows older than keep_hourly
    hourly_rows: int = 0  # hourly rows in the store afterwards

    def as_dict(self) -> dict[str, int]:
        """The counts, for ``--json``."""
        return {"rolled_up": self.rolled_up, "batches": self.batches,
                "hourly_rows": self.hourly_rows, "hourly_deleted": self.hourly_deleted}


def parse_age(text: str) -> float:
    """``7d``, ``90d``, ``12h``, ``2w``, ``30m`` or plain seconds, as seconds."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise UsageError(f"not an age: {text!r} (use e.g. 7d, 12h, 90d)") from None
    if not value > 0 or value == float("inf"):
        raise UsageError(f"an age must be positive: {text!r}")
    return value


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _aggregate(rows: list[tuple[Any, ...]]) -> dict[tuple[str, float, str], list[float]]:
    """(device, hour, kind) -> the 10 summed columns of ``messages_hourly`` after ``kind``."""
    acc: dict[tuple[str, float, str], list[float]] = {}
    for _id, device, kind, ts, payload in rows:
        hour = float(ts) // HOUR * HOUR
        a = acc.setdefault((device, hour, kind), [0.0] * 10)
        a[0] += 1
        if kind != "metrics":
            continue
        try:
            body = json.loads(payload).get("body") or {}
        except (ValueError, AttributeError):  # stored rows were validated; stay safe anyway
            continue
        if not isinstance(body, dict):
            continue
        for i, key in ((1, "inferences"), (2, "fallback"), (3, "degraded")):
            a[i] += _num(body.get(key)) or 0
        for i, (outer, inner) in ((4, ("latency_ms", "p95")), (6, ("confidence", "p50")),
                                  (8, ("drift", "input_psi"))):
            part = body.get(outer)
            v = _num(part.get(inner)) if isinstance(part, dict) else None
            if v is not None:
                a[i] += v
                a[i + 1] += 1
    return acc


def _roll_batch(store: Store, cutoff: float, after_id: int, batch: int,
                result: PruneResult) -> int | None:
    """Roll up and delete the next ``batch`` raw rows older than ``cutoff`` with an id
    above ``after_id``; returns the last id handled, None when there was nothing."""
    with store.transaction() as st:
        rows = st.query("SELECT id, device, kind, ts, payload FROM messages "
                        "WHERE id > ? AND ts < ? ORDER BY id LIMIT ?",
                        (after_id, cutoff, batch))
        if not rows:
            return None
        acc = _aggregate(rows)
        params = [(d, h, k, int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], int(a[5]),
                   a[6], int(a[7]), a[8], int(a[9])) for (d, h, k), a in acc.items()]
        st.execute_many(_UPSERT, params)
        ids = [int(r[0]) for r in rows]
        deleted = 0
        for i in range(0, len(ids), _IDS_PER_DELETE):
            chunk = ids[i:i + _IDS_PER_DELETE]
            deleted += st.execute("DELETE FROM messages WHERE id IN ("
                                  + ", ".join("?" * len(chunk)) + ")", chunk)
    result.rolled_up += deleted
    result.batches += 1
    return ids[-1]


def prune(store: Store, *, keep_raw: float, keep_hourly: float, now: float | None = None,
          batch: int = 5_000, on_batch: Callable[[PruneResult], None] | None = None
          ) -> PruneResult:
    """Roll up raw messages older than ``keep_raw`` seconds and delete them, then delete
    hourly rows older than ``keep_hourly``; every ``batch`` rows is its own transaction."""
    if keep_hourly < keep_raw:
        raise UsageError("--keep-hourly must be at least --keep-raw (hourly rows replace "
                         "the raw ones they summarize)")
    if batch < 1:
        raise UsageError("the batch size must be at least 1")
    now = time.time() if now is None else now
    result = PruneResult()
    raw_cutoff = now - keep_raw
    last = 0
    while True:
        got = _roll_batch(store, raw_cutoff, last, batch, result)
        if got is None:
            break
        last = got
        if on_batch is not None:
            on_batch(result)
    hour_cutoff = (now - keep_hourly) // HOUR * HOUR
    while True:  # an hour of the fleet at a time: bounded like the raw batches
        oldest = store.query("SELECT MIN(hour) FROM messages_hourly")[0][0]
        if oldest is None or float(oldest) >= hour_cutoff:
            break
        with store.transaction() as st:
            result.hourly_deleted += st.execute(
                "DELETE FROM messages_hourly WHERE hour <= ? AND hour < ?",
                (float(oldest), hour_cutoff))
    result.hourly_rows = int(store.query("SELECT COUNT(*) FROM messages_hourly")[0][0])
    return result
