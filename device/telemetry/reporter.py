"""What a device reports: a metrics snapshot on an interval, and events when they happen.

The body is built from the shared metrics registry (the runtime, serial reader and
fallback count into it under the names in :data:`HEADLINE`; every other counter and
gauge rides along as-is), plus drift scores, the spool's state and system figures.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.sysstats import SystemSampler
from edgefleet.device.wire.telemetry import HEADLINE

__all__ = ["TelemetryReporter", "build_metrics_body"]

log = logging.getLogger(__name__)


def _hist(snap: dict[str, Any], name: str) -> dict[str, Any] | None:
    h = snap["histograms"].get(name)
    return dict(h) if h else None


def build_metrics_body(metrics: Metrics, *, drift: DriftMonitor | None = None,
                       spool: dict[str, int] | None = None,
                       system: dict[str, float | int | None] | None = None) -> dict[str, Any]:
    """One ``metrics`` message body (see docs/telemetry.md for every field)."""
    snap = metrics.snapshot()
    c, g = snap["counters"], snap["gauges"]
    eps = g.get(HEADLINE["epsilon"])
    return {
        "inferences": int(c.get(HEADLINE["inferences"], 0)),
        "local": int(c.get(HEADLINE["local"], 0)),
        "fallback": int(c.get(HEADLINE["fallback"], 0)),
        "degraded": int(c.get(HEADLINE["degraded"], 0)),
        "latency_ms": _hist(snap, HEADLINE["latency_ms"]),
        "confidence": _hist(snap, HEADLINE["confidence"]),
        "drift": drift.scores() if drift else None,
        "model": {k: (None if g.get(HEADLINE[f"model_{k}"]) is None
                      else str(g.get(HEADLINE[f"model_{k}"])))
                  for k in ("name", "version", "variant")},
        "training": {"state": None if g.get(HEADLINE["training_state"]) is None
                     else str(g.get(HEADLINE["training_state"])),
                     "epsilon": float(eps) if isinstance(eps, int | float) else None},
        "system": system or {},
        "spool": spool or {},
        "counters": c,
        "gauges": {k: v for k, v in g.items() if not isinstance(v, str) or len(v) <= 200},
    }


class TelemetryReporter:
    """Publishes a metrics snapshot every ``interval`` seconds, and events on demand."""

    def __init__(self, publisher: TelemetryPublisher, *, interval: float = 10.0,
                 metrics: Metrics | None = None, drift: DriftMonitor | None = None,
                 extra: Callable[[], dict[str, Any]] | None = None) -> None:
        self.publisher = publisher
        self.interval = interval
        self.metrics = metrics or default_metrics()
        self.drift = drift
        self.extra = extra
        self.sampler = SystemSampler()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def body(self) -> dict[str, Any]:
        """The metrics body as it would be sent now."""
        spool = self.publisher.spool
        body = build_metrics_body(
            self.metrics, drift=self.drift, system=self.sampler.sample(),
            spool={"pending": spool.count(), "dropped": spool.dropped(),
                   "bytes": spool.nbytes()})
        if self.extra:
            body.update(self.extra())
        return body

    def report(self) -> int:
        """Spool one metrics message now; returns its sequence number."""
        return self.publisher.publish("metrics", self.body())

    def event(self, kind: str, **data: Any) -> int:
        """Spool an event (model swapped, fallback opened, ...) now."""
        return self.publisher.publish("event", {"kind": kind, **data})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.report()
            except Exception:
                log.exception("building a telemetry report failed")
                self.metrics.inc("telemetry_report_errors")

    def start(self) -> TelemetryReporter:
        """Report on the interval from a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="telemetry-report",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reporting (the publisher keeps running until stopped itself)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
