"""``/metrics`` for a server service: its :class:`Metrics` registry through prometheus-client.

The services already count everything in a :class:`~edgefleet.device.core.metrics.Metrics`
registry (what ``--json`` prints on exit); :class:`MetricsCollector` translates a snapshot
at each scrape (:func:`edgefleet.device.core.prom_text.families`), so nothing is counted
twice. :func:`serve_metrics` runs a separate plain-HTTP listener, loopback by default: the
registry's own port may demand client certificates (mutual TLS) and the MQTT-only
services have no HTTP port at all, so one small listener per service is simplest.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.prom_text import Family, families

__all__ = ["DEFAULT_METRICS_HOST", "MetricsCollector", "MetricsEndpoint", "as_metric",
           "serve_metrics"]

log = logging.getLogger(__name__)

#: Where a service's metrics listener binds unless told otherwise.
DEFAULT_METRICS_HOST = "127.0.0.1"


def as_metric(fam: Family) -> Metric:
    """A :class:`Family` as prometheus-client's metric object (the same samples)."""
    m: Metric
    if fam.kind == "counter":
        m = CounterMetricFamily(fam.name, fam.help)
    elif fam.kind == "histogram":
        m = HistogramMetricFamily(fam.name, fam.help)
    else:
        m = GaugeMetricFamily(fam.name, fam.help)
    for suffix, labels, value in fam.samples:
        m.add_sample(fam.name + suffix, labels, value)
    return m


class MetricsCollector(Collector):
    """Everything in ``metrics``, translated at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for fam in families(self.metrics.snapshot()):
            yield as_metric(fam)


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` listener; :meth:`close` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(port: int, collectors: Iterable[Collector], *,
                  host: str = DEFAULT_METRICS_HOST, process: bool = True) -> MetricsEndpoint:
    """Serve ``collectors`` (and the process' CPU, memory, file descriptors) on
    ``http://host:port/metrics`` from a daemon thread; ``port`` 0 picks a free one."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    if process:
        ProcessCollector(namespace="edgefleet", registry=registry)
    if not _loopback(host):
        log.warning("metrics on %s are open to the network (plain HTTP, no login)", host)
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics at http://%s:%d/metrics", host, bound)
    return MetricsEndpoint(host, bound, server, thread)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"

