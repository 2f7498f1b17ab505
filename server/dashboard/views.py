"""What each dashboard page shows, read with the functions the CLI uses.

``fleet ls``'s rows (:func:`edgefleet.server.telemetry.rows.device_row`), the store's
alerts and events, the rollout controller's rows and the audit log, the retraining
approvals, and the FL store with the report's spread and declines. Nothing here writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.telemetry.alerts import acknowledged
from edgefleet.server.telemetry.rows import device_row
from edgefleet.server.telemetry.store import Store

if TYPE_CHECKING:
    from edgefleet.device.wire.logs import LogLine
    from edgefleet.server.registry.repository import Registry
    from edgefleet.server.rollout.controller import RolloutController
    from edgefleet.server.rollout.fleet_view import FleetView

__all__ = ["LOG_REASONS", "MAX_DEVICES", "LogFetcher", "Sources", "alerts_view",
           "approvals_view", "device_logs", "device_view", "fl_view", "fleet_rows", "live_rows",
           "rollouts_view"]

#: Rows a page or an SSE message carries at most (the rest is counted, not shown).
MAX_DEVICES = 500
#: Metrics messages shown on a device page.
HISTORY = 50
#: Why a device's logs are not shown, as counted and answered; anything else the device
#: says (its ``error`` is device text) is counted as ``device_refused``.
LOG_REASONS = ("timeout", "broker_unreachable", "rate_limited", "device_refused")


class LogFetcher(Protocol):
    """What the device page needs of ``devices logs``' :class:`LogClient`."""

    def fetch(self, *, lines: int = 200, since_s: float | None = None, level: str = "DEBUG",
              timeout: float = 10.0) -> list[LogLine]: ...


@dataclass
class Sources:
    """Where the fleet's state lives, resolved by ``edgefleet dashboard serve`` with the
    CLI's own option helpers; the registry and the rollout controller are opened per
    request by the functions the CLI commands call (``open_registry``, the rollout
    commands' controller on the operator's broker account)."""

    store: Store
    #: The registry folder (``retrain.db`` and ``audit.jsonl`` live there), or None.
    registry: Path | None = None
    open_registry: Callable[[], Registry] | None = None
    controller: Callable[[], tuple[RolloutController, FleetView]] | None = None
    fl_db: Path | None = None
    #: ``{device: group}`` from the fleet home's device table (empty without a home).
    groups: dict[str, str] = field(default_factory=dict)
    #: ε budget shown when a device's report does not carry its own.
    epsilon_budget: float = 10.0
    #: One operator connection asking a device for its logs (``devices logs``' client on
    #: the operator account), or None without a broker account.
    logs: Callable[[str], AbstractContextManager[LogFetcher]] | None = None

    def audit(self) -> AuditLog:
        """The registry's audit log, where every dashboard action lands."""
        if self.registry is None:
            raise RuntimeError("no registry: actions need its audit log")
        return AuditLog(self.registry / "audit.jsonl")


def _latency(body: dict[str, Any] | None) -> dict[str, Any]:
    lat = (body or {}).get("latency_ms") or {}
    return {"p50": lat.get("p50"), "p95": lat.get("p95")} if isinstance(lat, dict) else {}


def fleet_rows(src: Sources, *, status: str = "", group: str = "",
               text: str = "") -> tuple[list[dict[str, Any]], int]:
    """``fleet ls`` rows plus local share, latency, group and ε budget, filtered; and how
    many matched in all (at most :data:`MAX_DEVICES` rows are returned)."""
    out: list[dict[str, Any]] = []
    matched = 0
    text = text.lower()
    for d in src.store.devices(with_metrics=True):  # one query, not one more per row
        r = device_row(d)
        r["group"] = src.groups.get(r["device"], "")
        if status and (status == "online") != r["online"]:
            continue
        if group and r["group"] != group:
            continue
        if text and text not in r["device"].lower() and text not in (
                r["model_version"] or "").lower():
            continue
        matched += 1
        if len(out) >= MAX_DEVICES:
            continue
        n = d["n_inferences"] or 0
        r["local_rate"] = round(d["n_local"] / n, 4) if n else None
        body = json.loads(d["last_metrics"]) if d["last_metrics"] else {}
        r["latency"] = _latency(body)
        budget = (body.get("training") or {}).get("budget") if isinstance(body, dict) else None
        r["epsilon_budget"] = float(budget) if isinstance(budget, int | float) else \
            src.epsilon_budget
        out.append(r)
    return out, matched


def live_rows(src: Sources) -> dict[str, Any]:
    """The SSE message: per device the numbers pages show live, plus open alert count."""
    rows, total = fleet_rows(src)
    return {"ts": time.time(), "devices": total, "open_alerts": len(src.store.open_alerts()),
            "rows": {r["device"]: {k: r[k] for k in (
                "online", "last_seen", "model_version", "inferences", "fallback_rate",
                "degraded_rate", "local_rate", "drift", "epsilon")} | {
                "p95": r["latency"].get("p95")} for r in rows}}


def device_view(src: Sources, device: str) -> dict[str, Any] | None:
    """``fleet show``: the row, its latest report, its recent metrics and events."""
    d = src.store.device(device)
    if d is None:
        return None
    row = device_row(d)
    history = []
    for m in src.store.messages(device=device, kind="metrics", limit=HISTORY, newest=True):
        try:
            body = json.loads(m["payload"]).get("body", {})
        except (ValueError, AttributeError):
            continue
        if not isinstance(body, dict):
            continue
        n = body.get("inferences") or 0
        drift = body.get("drift") or {}
        history.append({"ts": m["ts"], "inferences": n,
                        "fallback_rate": (body.get("fallback") or 0) / n if n else None,
                        "p95": _latency(body).get("p95"),
                        "drift_input": drift.get("input_psi") if isinstance(drift, dict)
                        else None,
                        "drift_confidence": drift.get("confidence_psi")
                        if isinstance(drift, dict) else None})
    return {"row": {**row, "group": src.groups.get(device, ""),
                    "duplicates": d["duplicates"], "boot": d["boot"]},
            "latency": _latency(d["last_metrics"]),
            "system": (d["last_metrics"] or {}).get("system") or {},
            "history": history[::-1], "events": src.store.events(device=device, limit=20)}


def device_logs(src: Sources, device: str, *, lines: int, level: str,
                timeout: float) -> dict[str, Any]:
    """``devices logs DEVICE``: its recent lines (text made printable, not yet escaped), or
    why not (``reason`` one of :data:`LOG_REASONS`, ``error`` a message to show)."""
    from edgefleet.server.fleet.device_logs import DeviceLogsError, printable

    if src.logs is None:
        raise RuntimeError("remote logs need the broker's operator account (run the "
                           "dashboard with --home)")
    try:
        with src.logs(device) as client:
            got = client.fetch(lines=lines, level=level, timeout=timeout)
    except DeviceLogsError as exc:
        reason = exc.reason if exc.reason in LOG_REASONS else "device_refused"
        return {"lines": [], "reason": reason, "error": printable(str(exc))[:300]}
    return {"lines": [{"ts": ln.ts, "level": printable(ln.level)[:10],
                       "logger": printable(ln.logger)[:80], "msg": printable(ln.msg)}
                      for ln in got[-lines:]], "reason": None, "error": None}


def alerts_view(src: Sources, limit: int = 50) -> dict[str, Any]:
    """``edgefleet alerts``: open alerts (with who acknowledged them) and recent events."""
    acks = acknowledged(src.store)
    open_ = [{**a, "acknowledged_by": acks.get((a["device"], a["kind"]))}
             for a in src.store.open_alerts()]
    events = [e for e in src.store.events(limit=limit * 4)
              if e["kind"].startswith(("alert.", "resolved.", "ack."))][:limit]
    return {"open": open_, "events": events}


def approvals_view(src: Sources) -> list[dict[str, Any]]:
    """``edgefleet approvals --all``: retraining requests, newest first."""
    from edgefleet.server.retrain.policy import APPROVALS_DB, Approvals

    if src.registry is None or not (src.registry / APPROVALS_DB).exists():
        return []
    approvals = Approvals(src.registry / APPROVALS_DB)
    try:
        return approvals.rows()[::-1]
    finally:
        approvals.db.close()


class _NoPublish:
    """A publisher for read-only controllers: pages never publish."""

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        raise RuntimeError("the dashboard's read views do not publish")


def rollouts_view(src: Sources, limit: int = 30) -> dict[str, Any]:
    """Rollouts newest first with canary progress (devices reporting the candidate) and the
    guard's and operators' decisions from the audit log; registered versions."""
    if src.open_registry is None:
        return {"rollouts": [], "models": [], "missing": True}
    from edgefleet.server.rollout.controller import RolloutController

    reg = src.open_registry()
    try:
        ctl = RolloutController(reg, _NoPublish())
        try:
            rollouts = ctl.rollouts()[:limit]
        finally:
            ctl.close()
        models = [m.as_dict() for m in reg.list()]
        decisions: dict[str, list[dict[str, Any]]] = {}
        for e in reg.audit.entries()[-2000:]:
            rid = (e.get("details") or {}).get("rollout")
            if str(e.get("action", "")).startswith("rollout.") and rid:
                decisions.setdefault(str(rid), []).append(e)
    finally:
        reg.close()
    versions = {d["device"]: d["model_version"] for d in src.store.devices()}
    out = []
    for r in rollouts:
        on = sum(1 for d in r.devices if versions.get(d) == r.version)
        out.append({**r.as_dict(), "on_candidate": on,
                    "decisions": decisions.get(r.id, [])[-10:]})
    return {"rollouts": out, "models": models[-50:], "missing": False}


def fl_view(src: Sources, limit: int = 10) -> list[dict[str, Any]]:
    """Recent federated runs: accuracy and ε per round, per-device spread of the last
    round, declines by reason (what ``edgefleet report --fl-db`` shows)."""
    if src.fl_db is None or not src.fl_db.exists():
        return []
    from edgefleet.server.fl.robust import device_spread
    from edgefleet.server.fl.store import FlStore, declines_by_reason

    store = FlStore(src.fl_db)
    out = []
    for run in store.runs(limit):
        rounds = store.rounds(run.tag)
        evals = store.device_evals(run.tag)
        last = evals[max(evals)] if evals else {}
        out.append({"tag": run.tag, "status": run.status, "error": run.error,
                    "strategy": run.params.get("strategy"),
                    "rounds": [{"round": r.round, "accuracy": r.accuracy, "epsilon": r.epsilon,
                                "nodes": r.nodes, "declined": r.declined,
                                "declines": r.declines or {}} for r in rounds],
                    "spread": device_spread({int(n): a for n, a in last.items()}),
                    "declines": declines_by_reason(rounds)})
    return out
