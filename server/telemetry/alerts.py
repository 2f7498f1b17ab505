"""Fleet alerts: drift, fallback rate, degraded rate, silence, a device whose SuperNode
cannot run; written as events.

An alert is raised once when its condition starts (an ``alert.<kind>`` event and an
``open_alerts`` row) and resolved once when it ends (``resolved.<kind>``), so a device
that stays drifted does not write an event per report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import UsageError
from edgefleet.device.wire.telemetry import MetricsBody
from edgefleet.server.telemetry.store import Store

__all__ = ["AlertThresholds", "DriftVerdict", "acknowledge", "acknowledged", "check_metrics",
           "check_silent", "drift_verdict"]


class AlertThresholds(StrictModel):
    """When to raise an alert."""

    #: PSI above this (mean over input features, or on confidences) is drift, provided it
    #: is also above the PSI that sampling noise alone reaches at the report's window.
    drift_psi: float = Field(default=0.25, gt=0)
    fallback_rate: float = Field(default=0.3, ge=0, le=1)
    degraded_rate: float = Field(default=0.1, ge=0, le=1)
    #: Rates are judged only once a device has made this many inferences.
    min_inferences: int = Field(default=50, ge=1)
    #: A device not heard from for this many seconds is silent.
    silent_after: float = Field(default=120.0, gt=0)


def _set(store: Store, device: str, kind: str, firing: bool, ts: float, message: str,
         data: dict[str, object], open_now: set[str] | None = None) -> None:
    """Raise or resolve one alert. ``open_now`` (the device's open alert kinds, read
    once per batch) skips the statements that would change nothing: a device that stays
    healthy or stays alerted costs no round trip."""
    if firing:
        if open_now is not None and kind in open_now:
            return
        if store.open_alert(device, kind, ts):
            store.add_event(ts, device, f"alert.{kind}", "warning", message, data)
    elif (open_now is None or kind in open_now) and store.close_alert(device, kind):
        store.add_event(ts, device, f"resolved.{kind}", "info", f"{kind} back to normal", data)


@dataclass(frozen=True)
class DriftVerdict:
    """Whether one drift report is drift, and the score that says so."""

    firing: bool
    #: The score judged: the one over its bar if any, else the highest.
    score: str
    psi: float
    #: max(threshold, the score's noise level at the report's window).
    bar: float


def drift_verdict(drift: dict[str, float | int | None] | None,
                  threshold: float) -> DriftVerdict | None:
    """Drift when a PSI (``input_psi`` or ``confidence_psi``) is above the threshold *and*
    above what sampling noise alone reaches at the report's window (``*_noise``, see
    :mod:`edgefleet.device.inference.drift`; an agent that does not send it is judged on
    the threshold alone). None when the report has no score yet."""
    judged: list[DriftVerdict] = []
    for key in ("input_psi", "confidence_psi"):
        value = (drift or {}).get(key)
        if value is None:
            continue
        noise = (drift or {}).get(f"{key}_noise")
        bar = max(threshold, float(noise) if noise is not None else 0.0)
        judged.append(DriftVerdict(float(value) > bar, key, float(value), bar))
    if not judged:
        return None
    return max(judged, key=lambda v: (v.firing, v.psi))


def check_metrics(store: Store, device: str, body: MetricsBody, ts: float,
                  th: AlertThresholds, open_now: set[str] | None = None) -> None:
    """Raise or resolve the drift and rate alerts for one device's latest report.

    ``open_now``: the device's open alert kinds, from :meth:`Store.open_alert_kinds`
    inside the same transaction (the ingest reads them for a whole batch in one query);
    None reads nothing and lets each statement find out."""
    drift = body.drift or {}
    verdict = drift_verdict(drift, th.drift_psi)
    if verdict is not None:
        _set(store, device, "drift", verdict.firing, ts,
             f"drift: {verdict.score.replace('_', ' ')} {verdict.psi:.3f} > {verdict.bar:.3g}",
             {k: drift.get(k) for k in ("input_psi", "confidence_psi", "input_psi_noise",
                                        "confidence_psi_noise", "window")}, open_now)
    # The agent reports training state "unavailable" once its SuperNode exhausted its
    # restart budget: that device silently left federated learning otherwise.
    _set(store, device, "fl_unavailable", body.training.get("state") == "unavailable", ts,
         "flower-supernode keeps exiting: no federated learning on this device", {}, open_now)
    if body.inferences >= th.min_inferences:
        for kind, n, limit in (("fallback_rate", body.fallback, th.fallback_rate),
                               ("degraded_rate", body.degraded, th.degraded_rate)):
            rate = n / body.inferences
            _set(store, device, kind, rate > limit, ts,
                 f"{kind.replace('_', ' ')} {rate:.1%} > {limit:.0%}",
                 {"rate": rate, "count": n, "inferences": body.inferences}, open_now)


def check_silent(store: Store, now: float, th: AlertThresholds) -> None:
    """Raise ``silent`` for devices not heard from in ``silent_after`` seconds (the open
    alerts read in one query: a fleet that stays heard from costs no statement each)."""
    devices = store.devices()
    open_now = store.open_alert_kinds([d["device"] for d in devices])
    for dev in devices:
        seen = dev["last_seen"] or dev["status_ts"]
        if seen is None:
            continue
        quiet = now - float(seen)
        _set(store, dev["device"], "silent", quiet > th.silent_after, now,
             f"no telemetry for {quiet:.0f} s", {"last_seen": seen}, open_now[dev["device"]])


class _Audit(Protocol):
    def append(self, action: str, *, actor: str | None = None,
               **details: Any) -> dict[str, Any]: ...


def acknowledge(store: Store, audit: _Audit, device: str, kind: str, actor: str,
                note: str = "") -> dict[str, Any]:
    """Record that ``actor`` has seen an open alert (an ``ack.<kind>`` event and an audit
    entry); the alert stays open until its condition ends. Unknown alerts are refused."""
    opened = next((a for a in store.open_alerts()
                   if a["device"] == device and a["kind"] == kind), None)
    if opened is None:
        raise UsageError(f"no open {kind!r} alert on {device!r} (see `edgefleet alerts`)")
    now = time.time()
    store.add_event(now, device, f"ack.{kind}", "info", f"{kind} acknowledged by {actor}",
                    {"actor": actor, "since": opened["since"], "note": note[:500]})
    audit.append("alert.ack", actor=actor, device=device, kind=kind, since=opened["since"],
                  note=note[:500])
    return {**opened, "acknowledged_by": actor, "acknowledged": now}


def acknowledged(store: Store, limit: int = 2000) -> dict[tuple[str, str], str]:
    """``{(device, kind): actor}`` of open alerts acknowledged since they were raised."""
    open_ = {(a["device"], a["kind"]): a["since"] for a in store.open_alerts()}
    out: dict[tuple[str, str], str] = {}
    for e in store.events(prefix="ack.", limit=limit):
        key = (e["device"], e["kind"].removeprefix("ack."))
        if key in open_ and key not in out and e["ts"] >= open_[key]:
            out[key] = str(e["data"].get("actor", "?"))
    return out
