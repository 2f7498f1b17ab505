"""Where a rollout's health comes from, and what checking it must remember.

:class:`StoreHealthSource` measures a device from the telemetry store's counters since the
rollout began; :class:`CombinedHealth` adds the update-state view's rollbacks and
refusals; :class:`RolloutLedger` keeps the baselines and "candidate seen" marks in
``rollouts.db`` (:mod:`edgefleet.server.rollout.schema`), so a restarted or second guard
agrees with the first.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from typing import Any, Protocol

from edgefleet.device.core.guarded_json import JsonLimits, JsonRejected, loads_guarded
from edgefleet.device.wire.telemetry import MAX_PAYLOAD_BYTES
from edgefleet.server.rollout.records import (
    Counts,
    HealthRates,
    HealthSource,
    json_object,
)

__all__ = ["CombinedHealth", "MetricsStore", "RolloutLedger", "StoreHealthSource"]

#: A stored telemetry message (written by an ingest, possibly an older one).
_STORED = JsonLimits(max_bytes=MAX_PAYLOAD_BYTES * 2, max_depth=16, max_keys=4096,
                     max_list=4096, max_string=16384)


class MetricsStore(Protocol):
    """What health needs of the telemetry store
    (:class:`~edgefleet.server.telemetry.store.Store`)."""

    def device(self, device: str) -> dict[str, Any] | None:
        """The device's row with its ``last_metrics`` body, or None."""

    def last_metrics_message(self, device: str,
                             before: float | None = None) -> dict[str, Any] | None:
        """The newest stored ``metrics`` message (at or before ``before``)."""


class RolloutLedger:
    """What a health check remembers per (rollout, device), in ``rollouts.db``.

    The first writer of a baseline wins (``INSERT ... DO NOTHING``, then read back), so two
    guards that start at once still agree. Without a connection it keeps the same records
    in memory (one process, e.g. a unit test).
    """

    def __init__(self, db: sqlite3.Connection | None = None) -> None:
        self._db = db
        self._mem: dict[tuple[str, str], tuple[Counts | None, bool]] = {}

    def baseline(self, rollout: str, device: str) -> Counts | None:
        """The stored counters this rollout measures the device from, if recorded."""
        if self._db is None:
            return self._mem.get((rollout, device), (None, False))[0]
        row = self._db.execute("SELECT boot, inferences, errors, degraded, fallback, recorded "
                               "FROM rollout_devices WHERE rollout = ? AND device = ?",
                               (rollout, device)).fetchone()
        if row is None or row[5] is None:
            return None
        return Counts(row[0], *(int(x) for x in row[1:5]))

    def set_baseline(self, rollout: str, device: str, c: Counts, *,
                     replace: bool = False) -> Counts:
        """Record ``c`` unless a baseline exists (``replace``: the device rebooted)."""
        if self._db is None:
            old, seen = self._mem.get((rollout, device), (None, False))
            if old is None or replace:
                self._mem[(rollout, device)] = (c, seen)
            return self._mem[(rollout, device)][0] or c
        vals = (c.boot, c.inferences, c.errors, c.degraded, c.fallback, time.time())
        self._db.execute("INSERT INTO rollout_devices (rollout, device) VALUES (?, ?) "
                         "ON CONFLICT (rollout, device) DO NOTHING", (rollout, device))
        self._db.execute("UPDATE rollout_devices SET boot = ?, inferences = ?, errors = ?, "
                         "degraded = ?, fallback = ?, recorded = ? WHERE rollout = ? AND "
                         "device = ?" + ("" if replace else " AND recorded IS NULL"),
                         (*vals, rollout, device))
        return self.baseline(rollout, device) or c

    def saw_candidate(self, rollout: str, device: str) -> None:
        """Note that the device ran the candidate (leaving it later is a rollback)."""
        if self._db is None:
            base, _ = self._mem.get((rollout, device), (None, False))
            self._mem[(rollout, device)] = (base, True)
            return
        self._db.execute("INSERT INTO rollout_devices (rollout, device, on_candidate) "
                         "VALUES (?, ?, ?) ON CONFLICT (rollout, device) DO UPDATE SET "
                         "on_candidate = COALESCE(rollout_devices.on_candidate, "
                         "excluded.on_candidate)", (rollout, device, time.time()))

    def seen_candidate(self, rollout: str, device: str) -> bool:
        """Whether the device was ever seen running the candidate."""
        if self._db is None:
            return self._mem.get((rollout, device), (None, False))[1]
        row = self._db.execute("SELECT on_candidate FROM rollout_devices WHERE rollout = ? "
                               "AND device = ?", (rollout, device)).fetchone()
        return row is not None and row[0] is not None


class StoreHealthSource:
    """Health from the telemetry store (``edgefleet ingest``): counter deltas since a baseline.

    The store keeps cumulative counts per device and agent boot. A rollout's baseline for a
    device is its newest stored ``metrics`` report from before the rollout began (else the
    counts when first asked), recorded once in the :class:`RolloutLedger`; so rates cover
    what happened since the rollout began, whoever asks and however often they restart.
    A device that rebooted since (new boot id, counters from zero) is measured from zero.
    """

    def __init__(self, store: MetricsStore, ledger: RolloutLedger | None = None) -> None:
        self.store = store
        self.ledger = ledger or RolloutLedger()

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """Rates of ``device`` from its newest stored metrics report."""
        row = self.store.device(device)
        if row is None:
            return None
        body = json_object(row.get("last_metrics"))
        newest = self._report(device, None)
        now = replace(Counts.from_body(newest[0] if newest else None, body),
                      inferences=int(row.get("n_inferences") or 0),
                      degraded=int(row.get("n_degraded") or 0),
                      fallback=int(row.get("n_fallback") or 0))
        key = rollout or ""
        base = self.ledger.baseline(key, device)
        if base is None:
            base = self.ledger.set_baseline(key, device, self._at_start(device, since, now))
        elif None not in (base.boot, now.boot) and base.boot != now.boot:
            base = self.ledger.set_baseline(key, device, Counts(now.boot), replace=True)
        d = [max(0, a - b) for a, b in zip(
            (now.inferences, now.errors, now.degraded, now.fallback),
            (base.inferences, base.errors, base.degraded, base.fallback), strict=True)]
        return HealthRates(row.get("model_version"), d[0], d[1], d[2], d[3])

    def _report(self, device: str, before: float | None) -> tuple[str, Counts] | None:
        """(boot, counters) of the newest stored metrics message (at or before ``before``)."""
        msg = self.store.last_metrics_message(device, before)
        if msg is None:
            return None
        try:  # stored by the ingest after its checks; read guarded all the same
            doc = loads_guarded(str(msg["payload"]).encode(), _STORED)
            body = doc.get("body") if isinstance(doc, dict) else None
            return str(msg["boot"]), Counts.from_body(str(msg["boot"]), body
                                                      if isinstance(body, dict) else {})
        except (JsonRejected, ValueError, AttributeError):
            return None

    def _at_start(self, device: str, since: float, now: Counts) -> Counts:
        """The device's counters when the rollout began, from the stored reports."""
        at = self._report(device, since) if since else None
        if at is None:
            return now  # nothing stored from before: count from now
        if now.boot is not None and at[0] != now.boot:
            return Counts(now.boot)  # rebooted after the rollout began: counting from zero
        return at[1]


class CombinedHealth:
    """Update-state health (rollbacks, refusals) and, where it is silent, the store's counters."""

    def __init__(self, view: HealthSource, store_health: HealthSource) -> None:
        self.view, self.store_health = view, store_health

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """The view's rates; the store's where the view has none (keeping its rollbacks)."""
        v = self.view.health(device, since, rollout)
        if v is not None and v.measured:
            return v
        s = self.store_health.health(device, since, rollout)
        if s is None or v is None:
            return v or s
        return replace(s, version=v.version or s.version, rolled_back=v.rolled_back,
                       refused=v.refused)
