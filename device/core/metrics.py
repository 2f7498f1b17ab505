"""In-process counters and histograms that telemetry reports.

Every component counts what happens to it (frames ok, CRC errors, invalid inputs,
fallbacks, ...) in one :class:`Metrics` registry; the telemetry publisher snapshots it
on an interval. Increments are a dict update under a lock: cheap enough for the
inference hot path on a Pi.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["CONFIDENCE_BUCKETS", "LATENCY_BUCKETS_MS", "Histogram", "Metrics", "default_metrics"]

#: Upper bounds (ms) of latency buckets: fine below 10 ms where int8 models live.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200,
                                         500, 1000, 5000)
CONFIDENCE_BUCKETS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))


class Histogram:
    """Fixed-bucket histogram; quantiles are estimated by linear interpolation in a bucket."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last bucket: above the largest bound
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += 1
        self.sum += value

    def quantile(self, q: float) -> float | None:
        """Estimated ``q``-quantile, or None when empty."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for i, c in enumerate(self.counts):
            if seen + c >= rank and c:
                lo = self.bounds[i - 1] if i > 0 else 0.0
                hi = self.bounds[i] if i < len(self.bounds) else self.bounds[-1]
                return lo + (hi - lo) * ((rank - seen) / c)
            seen += c
        return self.bounds[-1]

    def snapshot(self) -> dict[str, Any]:
        """Buckets, count and p50/p95/p99 as plain data."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "count": self.total,
                "sum": self.sum, "p50": self.quantile(0.5), "p95": self.quantile(0.95),
                "p99": self.quantile(0.99)}


class Metrics:
    """A registry of named counters, gauges and histograms, safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, int] = {}
        self._gauges: dict[str, float | str | None] = {}
        self._hists: dict[str, Histogram] = {}

    def inc(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (created at 0)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def set(self, name: str, value: float | str | None) -> None:
        """Set gauge ``name``."""
        with self._lock:
            self._gauges[name] = value

    def observe(self, name: str, value: float,
                bounds: Sequence[float] = LATENCY_BUCKETS_MS) -> None:
        """Add ``value`` to histogram ``name`` (created with ``bounds`` on first use)."""
        with self._lock:
            h = self._hists.get(name)
            if h is None:
                h = self._hists[name] = Histogram(bounds)
            h.observe(value)

    def recorder(self, counter: str, first: tuple[str, Sequence[float]],
                 second: tuple[str, Sequence[float]]) -> Callable[[float, float], None]:
        """A hot-path shortcut: ``rec(a, b)`` adds 1 to ``counter``, ``a`` to histogram
        ``first`` and ``b`` to ``second`` (each ``(name, bounds)``) under one lock.

        The histograms are looked up on the first record (not before, so a snapshot shows
        none until something was observed) and kept; a batch-1 inference then pays one
        lock and no name lookups instead of three of each (about 0.7 µs instead of 1.7).
        """
        lock, counters, registry = self._lock, self._counters, self._hists
        hists: list[Histogram] = []

        def record(a: float, b: float) -> None:
            with lock:
                counters[counter] = counters.get(counter, 0) + 1
                if not hists:
                    hists.extend(registry.get(name) or registry.setdefault(name, Histogram(bs))
                                 for name, bs in (first, second))
                hists[0].observe(a)
                hists[1].observe(b)

        return record

    def counter(self, name: str) -> int:
        """Current value of a counter (0 if never incremented)."""
        with self._lock:
            return self._counters.get(name, 0)

    def snapshot(self) -> dict[str, Any]:
        """Everything as plain data (for a telemetry payload)."""
        with self._lock:
            return {
                "counters": dict(self._counters),
                "gauges": dict(self._gauges),
                "histograms": {k: h.snapshot() for k, h in self._hists.items()},
            }


_default = Metrics()


def default_metrics() -> Metrics:
    """The process-wide registry the daemon's components share."""
    return _default
