"""Fleet-level gauges from the fleet store: one scrape reads the ``devices`` table once.

Series per device (label ``device``): online, seconds since last seen, inferences,
local/cloud/degraded shares, input and confidence drift PSI, ε spent, model (info-style)
and one ``edgefleet_device_alert_open{kind}`` per open alert (the same rows as
``edgefleet alerts``). About ten series per device: 10,000 devices are ~100k series,
well within one Prometheus. Cardinality is bounded by ``max_devices`` (devices past it,
in id order, get no per-device series; ``edgefleet_fleet_devices_unexported`` counts
them) and label values are cut to 64 characters; device ids are already bounded by the
enrollment pattern. Fleet totals (devices by status and training state, open alerts by
kind) are always complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgefleet.device.core.metrics import Metrics
from edgefleet.server.telemetry.alerts import AlertThresholds
from edgefleet.server.telemetry.store import Store

__all__ = ["DEFAULT_MAX_DEVICES", "FleetCollector"]

log = logging.getLogger(__name__)

#: Devices that get per-device series by default.
DEFAULT_MAX_DEVICES = 20_000

_P = "edgefleet_device_"


def _label(v: object) -> str:
    return str(v if v is not None else "")[:64]


class FleetCollector(Collector):
    """Reads the store at each scrape; a store error is counted, never raised."""

    def __init__(self, store: Store, *, epsilon_budget: float | None = None,
                 thresholds: AlertThresholds | None = None,
                 max_devices: int = DEFAULT_MAX_DEVICES,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.epsilon_budget = epsilon_budget
        self.thresholds = thresholds or AlertThresholds()
        self.max_devices = max_devices
        self.metrics = metrics or Metrics()
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        try:
            devices = self.store.devices()
            alerts = self.store.open_alerts()
        except Exception:  # a store outage shows as a scrape counter, not a 500
            log.exception("reading the fleet store for metrics failed")
            self.metrics.inc("fleet_metrics_store_errors")
            return
        now = self.clock()
        yield from self._totals(devices, alerts, now)
        yield from self._per_device(devices[:self.max_devices], alerts, now)

    def _totals(self, devices: list[dict[str, Any]], alerts: list[dict[str, Any]],
                now: float) -> Iterator[Metric]:
        silent_after = self.thresholds.silent_after
        status: dict[str, int] = {"online": 0, "offline": 0, "silent": 0}
        training: dict[str, int] = {}
        for d in devices:
            seen = d["last_seen"] or d["status_ts"]
            quiet = seen is None or now - float(seen) > silent_after
            key = "silent" if quiet else ("online" if d["online"] else "offline")
            status[key] += 1
            st = _label(d["training_state"] or "unknown")
            training[st] = training.get(st, 0) + 1
        g = GaugeMetricFamily("edgefleet_fleet_devices", "Devices in the fleet store by "
                              f"status (silent: not heard from in {silent_after:g} s).",
                              labels=["status"])
        for k, n in status.items():
            g.add_metric([k], n)
        yield g
        g = GaugeMetricFamily("edgefleet_fleet_devices_by_training_state",
                              "Devices by their reported federated-learning state.",
                              labels=["state"])
        for k, n in sorted(training.items()):
            g.add_metric([k], n)
        yield g
        by_kind: dict[str, int] = {}
        for a in alerts:
            by_kind[str(a["kind"])] = by_kind.get(str(a["kind"]), 0) + 1
        g = GaugeMetricFamily("edgefleet_fleet_alerts_open", "Open alerts by kind "
                              "(`edgefleet alerts`).", labels=["kind"])
        for k in ("drift", "fallback_rate", "degraded_rate", "silent", "fl_unavailable"):
            by_kind.setdefault(k, 0)
        for k, n in sorted(by_kind.items()):
            g.add_metric([_label(k)], n)
        yield g
        yield GaugeMetricFamily("edgefleet_fleet_devices_unexported", "Devices past "
                                "max_devices, without per-device series.",
                                value=max(0, len(devices) - self.max_devices))
        if self.epsilon_budget is not None:
            yield GaugeMetricFamily("edgefleet_fleet_epsilon_budget", "The fleet's privacy "
                                    "budget ε per device (retraining policy).",
                                    value=self.epsilon_budget)
        th = self.thresholds
        for name, value, what in (
                ("drift_psi", th.drift_psi, "PSI above which a report is drift"),
                ("fallback_rate", th.fallback_rate, "fallback (cloud) share alert"),
                ("degraded_rate", th.degraded_rate, "degraded share alert"),
                ("min_inferences", th.min_inferences, "inferences before rates are judged"),
                ("silent_after_seconds", th.silent_after, "silence alert")):
            yield GaugeMetricFamily(f"edgefleet_alert_threshold_{name}",
                                    f"Alert threshold: {what}.", value=float(value))

    def _per_device(self, devices: list[dict[str, Any]], alerts: list[dict[str, Any]],
                    now: float) -> Iterator[Metric]:
        def fam(name: str, what: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(_P + name, what, labels=["device", *extra])

        online = fam("online", "1 when the device's last status is online.")
        age = fam("last_seen_age_seconds", "Seconds since the device's last message.")
        inferences = fam("inferences", "Inferences in the device's latest report.")
        share = fam("share", "Share of inferences answered by where: local, cloud "
                    "(fallback to the scorer), degraded (local after a failed fallback).",
                    ("path",))
        drift = fam("drift_psi", "Drift PSI in the latest report.", ("score",))
        eps = fam("epsilon_spent", "Privacy ε the device has spent (its ledger).")
        model = fam("model_info", "The model the device serves (value 1).",
                    ("model", "version"))
        spool = fam("spool_dropped", "Telemetry messages the device's spool dropped.")
        for d in devices:
            dev = _label(d["device"])
            online.add_metric([dev], 1.0 if d["online"] else 0.0)
            seen = d["last_seen"] or d["status_ts"]
            if seen is not None:
                age.add_metric([dev], max(0.0, now - float(seen)))
            n = int(d["n_inferences"] or 0)
            inferences.add_metric([dev], n)
            if n:
                for path, col in (("local", "n_local"), ("cloud", "n_fallback"),
                                  ("degraded", "n_degraded")):
                    share.add_metric([dev, path], int(d[col] or 0) / n)
            for score, col in (("input", "drift_input"), ("confidence", "drift_confidence")):
                if d[col] is not None:
                    drift.add_metric([dev, score], float(d[col]))
            if d["epsilon"] is not None:
                eps.add_metric([dev], float(d["epsilon"]))
            if d["model_name"] is not None:
                model.add_metric([dev, _label(d["model_name"]), _label(d["model_version"])], 1)
            spool.add_metric([dev], int(d["spool_dropped"] or 0))
        yield from (online, age, inferences, share, drift, eps, model, spool)
        exported = {str(d["device"]) for d in devices}
        g = fam("alert_open", "1 per open alert (`edgefleet alerts`).", ("kind",))
        for a in alerts:
            if str(a["device"]) in exported:
                g.add_metric([_label(a["device"]), _label(a["kind"])], 1)
        yield g
