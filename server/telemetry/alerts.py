"""Fleet alerts: drift, fallback rate, degraded rate, silence, a device whose SuperNode
cannot run; written as events.

An alert is raised once when its condition starts (an ``alert.<kind>`` event and an
``open_alerts`` row) and resolved once when it ends (``resolved.<kind>``), so a device
that stays drifted does not write an event per report.
"""

from __future__ import annotations

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.wire.telemetry import MetricsBody
from edgefleet.server.telemetry.store import Store

__all__ = ["AlertThresholds", "check_metrics", "check_silent"]


class AlertThresholds(StrictModel):
    """When to raise an alert."""

    #: PSI above this (mean over input features, or on confidences) is drift.
    drift_psi: float = Field(default=0.25, gt=0)
    fallback_rate: float = Field(default=0.3, ge=0, le=1)
    degraded_rate: float = Field(default=0.1, ge=0, le=1)
    #: Rates are judged only once a device has made this many inferences.
    min_inferences: int = Field(default=50, ge=1)
    #: A device not heard from for this many seconds is silent.
    silent_after: float = Field(default=120.0, gt=0)


def _set(store: Store, device: str, kind: str, firing: bool, ts: float, message: str,
         data: dict[str, object]) -> None:
    if firing:
        if store.open_alert(device, kind, ts):
            store.add_event(ts, device, f"alert.{kind}", "warning", message, data)
    elif store.close_alert(device, kind):
        store.add_event(ts, device, f"resolved.{kind}", "info", f"{kind} back to normal", data)


def check_metrics(store: Store, device: str, body: MetricsBody, ts: float,
                  th: AlertThresholds) -> None:
    """Raise or resolve the drift and rate alerts for one device's latest report."""
    drift = body.drift or {}
    psi_in = drift.get("input_psi")
    psi_conf = drift.get("confidence_psi")
    worst = max((float(v) for v in (psi_in, psi_conf) if v is not None), default=None)
    if worst is not None:
        _set(store, device, "drift", worst > th.drift_psi, ts,
             f"drift PSI {worst:.3f} > {th.drift_psi}",
             {"input_psi": psi_in, "confidence_psi": psi_conf})
    # The agent reports training state "unavailable" once its SuperNode exhausted its
    # restart budget: that device silently left federated learning otherwise.
    _set(store, device, "fl_unavailable", body.training.get("state") == "unavailable", ts,
         "flower-supernode keeps exiting: no federated learning on this device", {})
    if body.inferences >= th.min_inferences:
        for kind, n, limit in (("fallback_rate", body.fallback, th.fallback_rate),
                               ("degraded_rate", body.degraded, th.degraded_rate)):
            rate = n / body.inferences
            _set(store, device, kind, rate > limit, ts,
                 f"{kind.replace('_', ' ')} {rate:.1%} > {limit:.0%}",
                 {"rate": rate, "count": n, "inferences": body.inferences})


def check_silent(store: Store, now: float, th: AlertThresholds) -> None:
    """Raise ``silent`` for devices not heard from in ``silent_after`` seconds."""
    for dev in store.devices():
        seen = dev["last_seen"] or dev["status_ts"]
        if seen is None:
            continue
        quiet = now - float(seen)
        _set(store, dev["device"], "silent", quiet > th.silent_after, now,
             f"no telemetry for {quiet:.0f} s", {"last_seen": seen})
