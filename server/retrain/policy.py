"""Drift-triggered retraining: sustained alerts in a group → federated run → canary → promotion.

:class:`RetrainController` is evaluated periodically (``edgefleet retrain watch``). Each
evaluation counts the group's devices with an open alert of a configured kind (drift,
degraded or fallback rate, written by the ingest service); when their share stays at or
above ``min_share`` for ``sustain_evaluations`` evaluations in a row *and* for
``sustain_seconds``, it triggers: optionally waits for an operator's approval, starts a
federated run for the group, registers the result and rolls it out as a canary that stops
by itself when unhealthy. Every step is an entry in the registry's audit log.

The run, the push and the rollout are injected callables (real ones in
:mod:`edgefleet.server.retrain.actions`), and so is the clock, so the policy is unit-tested
without processes. State (streaks, approvals, runs) lives in ``retrain.db`` so that
``--once`` invocations from cron continue where the last one stopped.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.core.sqlite import connect, migrate
from edgefleet.server.fleet.audit import AuditLog

__all__ = ["APPROVALS_DB", "MIGRATIONS", "Approvals", "CanaryOutcome", "Evaluation", "FleetSignals",
           "RetrainConfig", "RetrainController", "RetrainPolicy", "RunOutcome", "decide"]

log = logging.getLogger(__name__)
ACTOR = "retrain-policy"
#: The approvals' database in the registry folder (``edgefleet approvals``, the dashboard).
APPROVALS_DB = "retrain.db"

#: Schema versions of ``retrain.db`` (:mod:`edgefleet.device.core.sqlite`); version 1 is
#: the schema it had before versions were recorded, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: alert streaks per group, approval requests
        """CREATE TABLE IF NOT EXISTS streaks (grp TEXT PRIMARY KEY, count INTEGER NOT NULL,
            since REAL, last_run REAL)""",
        """CREATE TABLE IF NOT EXISTS approvals (id TEXT PRIMARY KEY, grp TEXT NOT NULL,
            created REAL NOT NULL, status TEXT NOT NULL, decided REAL, actor TEXT,
            details TEXT)""",
    ],
]


class RetrainPolicy(StrictModel):
    """The ``[retrain]`` section: when to retrain a group and how (docs/retraining.md)."""

    kinds: list[str] = Field(default_factory=lambda: ["drift", "degraded_rate",
                                                      "fallback_rate"])
    min_share: float = Field(default=0.5, gt=0, le=1, description="share of the group's devices "
                             "with an open alert of one of ``kinds``")
    sustain_evaluations: int = Field(default=3, ge=1)
    sustain_seconds: float = Field(default=0.0, ge=0)
    cooldown_seconds: float = Field(default=3600.0, ge=0,
                                    description="after a run, before the next")
    require_approval: bool = False
    epsilon_budget: float = Field(default=10.0, gt=0,
                                  description="per-device ε the fleet may spend")
    # The federated run.
    task: str = "digits"
    rounds: int = Field(default=3, ge=1)
    epsilon: float = Field(default=3.0, gt=0, description="ε of one retraining run")
    dp: str = "sample"
    min_nodes: int = Field(default=2, ge=1)
    pretrain_epochs: int = Field(default=20, ge=0)
    run_timeout: float = Field(default=900.0, gt=0)
    superlink: str = ""
    root_certificates: str = ""
    cloud_package: str = Field(default="",
                               description="if set, τ is chosen against it before push")
    base_model: str = Field(default="", description=(
        "MODEL the group runs: the retrained package becomes its next version (lineage "
        "parent), canaried as an upgrade"))
    # The rollout.
    canary_percent: float = Field(default=20.0, gt=0, le=100)
    canary_watch_seconds: float = Field(default=30.0, ge=0)
    canary_threshold: float = Field(default=0.2, gt=0, le=1)
    promote: bool = True


class RetrainConfig(StrictModel):
    """A retraining config file: one ``[retrain]`` table."""

    retrain: RetrainPolicy = Field(default_factory=RetrainPolicy)


class FleetSignals(Protocol):
    """What the policy reads about a group (the telemetry store and the fleet's device table)."""

    def members(self, group: str) -> list[str]:
        """Device ids of the group."""

    def alerting(self, devices: list[str], kinds: list[str]) -> list[str]:
        """Those of ``devices`` with an open alert of one of ``kinds``."""

    def epsilon(self, devices: list[str]) -> float | None:
        """The highest ε any of ``devices`` reported, or None if none reported."""


@dataclass(frozen=True)
class RunOutcome:
    """A finished federated run."""

    package: Path
    accuracy: float | None
    epsilon: float | None


@dataclass(frozen=True)
class CanaryOutcome:
    """How the rollout ended: ``promoted``, ``stopped`` (with a reason) or ``running``."""

    rollout: str
    status: str
    devices: list[str]
    reason: str | None = None


StartRun = Callable[[str, RetrainPolicy], RunOutcome]
Push = Callable[[Path], tuple[str, str]]
Canary = Callable[[str, str, RetrainPolicy], CanaryOutcome]
Promote = Callable[[str], None]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's result (``--json`` of ``retrain watch``)."""

    group: str
    action: str  # quiet | counting | cooldown | refused | awaiting_approval | denied | retrained
    alerting: int
    devices: int
    streak: int
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """Plain data."""
        return dict(self.__dict__)


class Approvals:
    """Pending, approved and denied retraining requests in ``retrain.db``."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = connect(path)
        migrate(self.db, MIGRATIONS, what="retrain.db has schema")

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        """Requests, oldest first (only ``status`` if given)."""
        q = "SELECT id, grp, created, status, decided, actor, details FROM approvals"
        rows = self.db.execute(q + (" WHERE status=?" if status else "") + " ORDER BY created",
                               (status,) if status else ())
        keys = ("id", "group", "created", "status", "decided", "actor", "details")
        return [{**dict(zip(keys, r, strict=True)), "details": json.loads(r[6] or "{}")}
                for r in rows]

    def request(self, group: str, now: float, details: dict[str, Any]) -> str:
        """A new pending request."""
        rid = uuid.uuid4().hex[:10]
        with self.db:
            self.db.execute("INSERT INTO approvals VALUES (?,?,?,?,?,?,?)",
                            (rid, group, now, "pending", None, None, json.dumps(details)))
        return rid

    def open_for(self, group: str) -> dict[str, Any] | None:
        """The group's newest request that is pending or approved and not yet used."""
        live = [r for r in self.rows() if r["group"] == group
                and r["status"] in ("pending", "approved", "denied")]
        return live[-1] if live else None

    def decide(self, rid: str, status: str, actor: str, now: float) -> dict[str, Any]:
        """Approve or deny a pending request; a :class:`UsageError` names what is wrong."""
        row = next((r for r in self.rows() if r["id"] == rid), None)
        if row is None:
            raise UsageError(f"no retraining request {rid!r} (see `edgefleet approvals`)")
        if row["status"] != "pending":
            raise UsageError(f"request {rid} is already {row['status']}")
        with self.db:
            self.db.execute("UPDATE approvals SET status=?, decided=?, actor=? WHERE id=?",
                            (status, now, actor, rid))
        return {**row, "status": status, "decided": now, "actor": actor}

    def close(self, rid: str, status: str) -> None:
        """Mark an approved/denied request as used (``done``/``closed``)."""
        with self.db:
            self.db.execute("UPDATE approvals SET status=? WHERE id=?", (status, rid))


class RetrainController:
    """Evaluates one group's alerts and, when sustained, retrains and rolls out."""

    def __init__(self, policy: RetrainPolicy, group: str, *, signals: FleetSignals,
                 audit: AuditLog, state: Path, start_run: StartRun, push: Push,
                 canary: Canary, promote: Promote,
                 clock: Callable[[], float] = time.time) -> None:
        self.policy, self.group, self.signals, self.audit = policy, group, signals, audit
        self.approvals = Approvals(state)
        self.db = self.approvals.db
        self.start_run, self.push, self.canary, self.promote = start_run, push, canary, promote
        self.clock = clock

    def _streak(self) -> tuple[int, float | None, float | None]:
        row = self.db.execute("SELECT count, since, last_run FROM streaks WHERE grp=?",
                              (self.group,)).fetchone()
        return (int(row[0]), row[1], row[2]) if row else (0, None, None)

    def _set_streak(self, count: int, since: float | None, last_run: float | None) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO streaks VALUES (?,?,?,?)",
                            (self.group, count, since, last_run))

    def _log(self, action: str, **details: Any) -> None:
        self.audit.append(f"retrain.{action}", actor=ACTOR, group=self.group, **details)

    def evaluate(self) -> Evaluation:
        """One evaluation: count, and when sustained, act (may run for minutes)."""
        p, now = self.policy, self.clock()
        members = self.signals.members(self.group)
        hot = self.signals.alerting(members, p.kinds)
        share = len(hot) / len(members) if members else 0.0
        count, since, last_run = self._streak()

        def result(action: str, **detail: Any) -> Evaluation:
            return Evaluation(self.group, action, len(hot), len(members), count, detail)

        if share < p.min_share:
            self._set_streak(0, None, last_run)
            count = 0
            return result("quiet", share=share)
        count, since = count + 1, since if since is not None else now
        self._set_streak(count, since, last_run)
        if count < p.sustain_evaluations or now - since < p.sustain_seconds:
            return result("counting", share=share, since=since)
        if last_run is not None and now - last_run < p.cooldown_seconds:
            return result("cooldown", until=last_run + p.cooldown_seconds)
        eps = self.signals.epsilon(members)
        if eps is not None and eps + p.epsilon > p.epsilon_budget:
            self._log("refused", reason="privacy budget", reported_epsilon=eps,
                      run_epsilon=p.epsilon, budget=p.epsilon_budget)
            self._set_streak(0, None, now)  # do not re-refuse every evaluation
            return result("refused", reported_epsilon=eps, budget=p.epsilon_budget)
        trigger = {"alerting": hot, "devices": len(members), "share": round(share, 3),
                   "evaluations": count, "since": since}
        approval = self.approvals.open_for(self.group) if p.require_approval else None
        if p.require_approval:
            if approval is None:
                self._log("trigger", **trigger)
                rid = self.approvals.request(self.group, now, trigger)
                self._log("approval_requested", request=rid)
                return result("awaiting_approval", request=rid)
            if approval["status"] == "pending":
                return result("awaiting_approval", request=approval["id"])
            if approval["status"] == "denied":
                self.approvals.close(approval["id"], "closed")
                self._set_streak(0, None, now)
                return result("denied", request=approval["id"])
        else:
            self._log("trigger", **trigger)
        try:
            detail = self._retrain(approval["id"] if approval else None)
        finally:
            if approval is not None:
                self.approvals.close(approval["id"], "done")
            self._set_streak(0, None, self.clock())
        count = 0
        return result("retrained", **detail)

    def _retrain(self, request: str | None) -> dict[str, Any]:
        p = self.policy
        self._log("run_started", task=p.task, rounds=p.rounds, epsilon=p.epsilon,
                  request=request)
        try:
            run = self.start_run(self.group, p)
        except EdgefleetError as exc:
            self._log("run_failed", error=str(exc))
            raise
        self._log("run_finished", accuracy=run.accuracy, epsilon=run.epsilon,
                  package=run.package.name)
        model, version = self.push(run.package)
        self._log("registered", model=model, version=version)
        out = self.canary(model, version, p)
        self._log("canary_started", rollout=out.rollout, model=model, version=version,
                  devices=out.devices)
        detail: dict[str, Any] = {"model": model, "version": version, "rollout": out.rollout,
                                  "accuracy": run.accuracy, "epsilon": run.epsilon,
                                  "canary": out.status}
        if out.status == "stopped":
            self._log("canary_stopped", rollout=out.rollout, reason=out.reason)
            detail["reason"] = out.reason
        elif out.status == "running" and p.promote:
            self.promote(model)
            self._log("promoted", rollout=out.rollout, model=model, version=version)
            detail["canary"] = "promoted"
        return detail


def decide(approvals: Approvals, audit: AuditLog, rid: str, approve: bool, actor: str,
           now: float | None = None) -> dict[str, Any]:
    """An operator's decision on a pending request, recorded in the audit log."""
    row = approvals.decide(rid, "approved" if approve else "denied", actor,
                           time.time() if now is None else now)
    audit.append("retrain.approved" if approve else "retrain.denied", actor=actor,
                 group=row["group"], request=rid)
    return row
