"""``edgefleet rollout guard``: stops unhealthy canaries whether or not anyone is watching.

``edgefleet rollout --watch`` only guards a canary while the operator's terminal stays
open. The guard is the same check as a service: every ``interval`` seconds it loads the
running rollouts from ``rollouts.db`` and runs :meth:`RolloutController.check` on each, so
the stop (re-assignments, audit entry, ``automatic``) is exactly the watch's. Its memory
(store baselines, candidate seen) is in ``rollouts.db``, so it can be restarted, and two
guards at once stop a canary once (see :mod:`edgefleet.server.rollout.controller`).

It never exits on a bad row or a vanished broker: an unreachable broker is retried with
:class:`~edgefleet.device.core.retry.Backoff` (full jitter), while disconnected no pass runs
(its health would be stale and its stops could not be published), and a pass that fails
is logged and retried on the next interval.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.retry import Backoff
from edgefleet.server.rollout.controller import RolloutController
from edgefleet.server.rollout.health import CombinedHealth, MetricsStore, StoreHealthSource
from edgefleet.server.rollout.records import (
    HealthSource,
    Publisher,
    Rollout,
    RolloutRegistry,
)

__all__ = ["GUARD_ACTOR", "BrokerView", "GuardPass", "RolloutGuard"]

log = logging.getLogger(__name__)

#: Bounds (s) of ``guard_pass_seconds``: one pass reads the broker view and the ledger.
PASS_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The audit-log actor of a guard's stops (``details.automatic`` is true as for ``--watch``).
GUARD_ACTOR = "rollout-guard"


class BrokerView(HealthSource, Publisher, Protocol):
    """A broker connection (a :class:`~edgefleet.server.rollout.fleet_view.FleetView`):
    device health in, assignments out, and whether it is up."""

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now."""

    def close(self) -> None:
        """Disconnect."""


@dataclass
class GuardPass:
    """What one pass saw: every rollout checked, and which of them it stopped."""

    checked: list[dict[str, Any]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    #: Device messages the broker view refused since it connected, by reason.
    rejected: dict[str, int] = field(default_factory=dict)
    #: Devices the director signed for outside a check (re-signed, or newly seen).
    signed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {"checked": self.checked, "stopped": self.stopped, "rejected": self.rejected,
                "signed": self.signed}


class RolloutGuard:
    """Checks every running canary each ``interval`` s; :meth:`run` until :meth:`stop`.

    ``open_view`` connects to the broker (a :class:`BrokerView`); ``store`` (optional) is
    the telemetry store, the health source where a device's update state is silent.
    """

    def __init__(self, registry: RolloutRegistry, open_view: Callable[[], BrokerView], *,
                 store: MetricsStore | None = None, interval: float = 10.0, settle: float = 1.0,
                 min_inferences: int = 20, backoff: Backoff | None = None,
                 metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.open_view = open_view
        self.store = store
        self.interval = interval
        self.settle = settle
        self.min_inferences = min_inferences
        self.backoff = backoff or Backoff(base=1.0, cap=60.0)
        #: Passes, failures, canaries stopped, pass durations (``/metrics``).
        self.metrics = metrics if metrics is not None else Metrics()
        self.passes = 0
        self.failures = 0
        self._view: BrokerView | None = None
        self._ctl: RolloutController | None = None
        self._stop = threading.Event()

    def _connect(self) -> tuple[RolloutController, BrokerView]:
        """The controller and a connected view (opened once, re-opened after a loss)."""
        if self._view is not None and not self._view.connected:
            log.warning("lost the broker; reconnecting")
            self._close_view()
        if self._view is None:
            self._view = self.open_view()
            self._stop.wait(self.settle)  # the retained update states arrive
            log.info("connected to the broker")
        if self._ctl is None:
            self._ctl = RolloutController(self.registry, self._view,
                                          min_inferences=self.min_inferences)
        self._ctl.publisher = self._view
        health: HealthSource = self._view
        if self.store is not None:
            health = CombinedHealth(self._view, StoreHealthSource(self.store, self._ctl.ledger))
        self._ctl.health = health
        return self._ctl, self._view

    def run_pass(self) -> GuardPass:
        """Check every running canary once (connecting first if needed)."""
        ctl, view = self._connect()
        out = GuardPass()
        rejected = getattr(view, "rejected", None)
        if callable(rejected):
            out.rejected = dict(rejected())
        for r in ctl.check_all(actor=GUARD_ACTOR):
            out.checked.append(self._summary(ctl, r))
            if r.status == "stopped":  # it was running or stopping when the pass began
                out.stopped.append(r.id)
        out.signed = ctl.maintain()
        self.passes += 1
        return out

    @staticmethod
    def _summary(ctl: RolloutController, r: Rollout) -> dict[str, Any]:
        seen = ctl.observed.get(r.id, {})
        return {"id": r.id, "model": r.model, "version": r.version, "status": r.status,
                "reason": r.reason, "threshold": r.threshold,
                "devices": {d: {"version": h.version, "inferences": h.inferences,
                                "bad_rate": round(h.bad_rate(), 4)} for d, h in seen.items()}}

    def run(self, on_pass: Callable[[GuardPass], None] | None = None) -> None:
        """Pass after pass until :meth:`stop`; broker and database trouble is waited out."""
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                result = self.run_pass()
            except (EdgefleetError, OSError, sqlite3.Error) as exc:
                self.failures += 1
                self.metrics.inc("guard_pass_failures")
                self._close_view()
                delay = self.backoff.next_delay()
                log.warning("guard pass failed (%s); retrying in %.1f s", exc, delay)
                self._stop.wait(delay)
                continue
            self.backoff.reset()
            m = self.metrics
            m.inc("guard_passes")
            m.inc("guard_canaries_stopped", len(result.stopped))
            m.set("guard_canaries_running", sum(c["status"] == "running" for c in result.checked))
            m.observe("guard_pass_seconds", time.perf_counter() - t0, PASS_BUCKETS_S)
            if on_pass is not None:
                on_pass(result)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current pass."""
        self._stop.set()

    def _close_view(self) -> None:
        if self._view is not None:
            try:
                self._view.close()
            except Exception:  # closing a dead connection must not stop the guard
                log.debug("closing the broker connection failed", exc_info=True)
            self._view = None

    def close(self) -> None:
        """Disconnect and close the database."""
        self._close_view()
        if self._ctl is not None:
            self._ctl.close()

