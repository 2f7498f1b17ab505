"""The retraining policy (server/retrain/policy.py) with a fake clock, fake signals, fake actions;
the approvals commands against the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.retrain.policy import (
    Approvals,
    CanaryOutcome,
    RetrainController,
    RetrainPolicy,
    RunOutcome,
    decide,
)
from tests.conftest import run_cli


class Signals:
    def __init__(self, n: int = 4) -> None:
        self.devices = [f"d{i}" for i in range(n)]
        self.hot: set[str] = set()
        self.eps: float | None = None

    def members(self, group: str) -> list[str]:
        return list(self.devices) if group == "lab" else []

    def alerting(self, devices: list[str], kinds: list[str]) -> list[str]:
        return sorted(self.hot & set(devices))

    def epsilon(self, devices: list[str]) -> float | None:
        return self.eps


class World:
    """Controller + fakes; records what the actions were asked to do."""

    def __init__(self, tmp: Path, canary_status: str = "running", fail_run: bool = False,
                 **policy: object) -> None:
        self.now = 1000.0
        self.sig = Signals()
        self.calls: list[tuple[str, ...]] = []
        self.audit = AuditLog(tmp / "audit.jsonl")
        self.canary_status, self.fail_run = canary_status, fail_run
        self.policy = RetrainPolicy(**{"sustain_evaluations": 3, "sustain_seconds": 0.0,
                                       "cooldown_seconds": 100.0, **policy})
        self.ctl = RetrainController(self.policy, "lab", signals=self.sig, audit=self.audit,
                                     state=tmp / "retrain.db", start_run=self.run,
                                     push=self.push, canary=self.canary,
                                     promote=self.promote, clock=lambda: self.now)

    def run(self, group: str, p: RetrainPolicy) -> RunOutcome:
        self.calls.append(("run", group))
        if self.fail_run:
            raise EdgefleetError("superlink unreachable")
        return RunOutcome(Path("pkg"), 0.9, 2.5)

    def push(self, package: Path) -> tuple[str, str]:
        self.calls.append(("push", str(package)))
        return "digits-fl", "1.0.1"

    def canary(self, model: str, version: str, p: RetrainPolicy) -> CanaryOutcome:
        self.calls.append(("canary", model, version))
        return CanaryOutcome("r1", self.canary_status, ["d1"],
                             "d1 rolled back" if self.canary_status == "stopped" else None)

    def promote(self, model: str) -> None:
        self.calls.append(("promote", model))

    def tick(self, dt: float = 10.0) -> str:
        self.now += dt
        return self.ctl.evaluate().action

    def actions(self) -> list[str]:
        return [e["action"] for e in self.audit.entries()]


def test_sustained_window_then_retrain_and_promote(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.sig.hot = {"d0", "d1"}  # 50 % = min_share
    assert [w.tick(), w.tick()] == ["counting", "counting"]
    w.sig.hot = {"d0"}  # 25 %: the streak breaks
    assert w.tick() == "quiet"
    w.sig.hot = {"d0", "d1", "d2"}
    assert [w.tick(), w.tick()] == ["counting", "counting"]
    assert w.calls == []
    assert w.tick() == "retrained"
    assert w.calls == [("run", "lab"), ("push", "pkg"), ("canary", "digits-fl", "1.0.1"),
                       ("promote", "digits-fl")]
    assert w.actions() == ["retrain.trigger", "retrain.run_started", "retrain.run_finished",
                           "retrain.registered", "retrain.canary_started", "retrain.promoted"]
    trig = w.audit.entries()[0]["details"]
    assert trig["alerting"] == ["d0", "d1", "d2"] and trig["evaluations"] == 3
    w.audit.verify()
    # Cooldown: alerts still up, but no second run until cooldown_seconds have passed.
    assert [w.tick(), w.tick(), w.tick()] == ["counting", "counting", "cooldown"]
    assert w.tick(100.0) == "retrained" and len([c for c in w.calls if c[0] == "run"]) == 2


def test_sustain_seconds_as_well_as_evaluations(tmp_path: Path) -> None:
    w = World(tmp_path, sustain_evaluations=2, sustain_seconds=60.0)
    w.sig.hot = set(w.sig.devices)
    assert [w.tick(), w.tick(), w.tick(), w.tick(), w.tick(), w.tick()] == ["counting"] * 6
    assert w.tick() == "retrained"  # 60 s after the first alerting evaluation


def test_stopped_canary_is_not_promoted(tmp_path: Path) -> None:
    w = World(tmp_path, canary_status="stopped", sustain_evaluations=1)
    w.sig.hot = set(w.sig.devices)
    ev = w.ctl.evaluate()
    assert ev.action == "retrained" and ev.detail["canary"] == "stopped"
    assert ("promote", "digits-fl") not in w.calls
    assert w.actions()[-1] == "retrain.canary_stopped"
    assert w.audit.entries()[-1]["details"]["reason"] == "d1 rolled back"


def test_budget_refusal(tmp_path: Path) -> None:
    w = World(tmp_path, sustain_evaluations=1, epsilon=3.0, epsilon_budget=10.0)
    w.sig.hot = set(w.sig.devices)
    w.sig.eps = 7.5  # 7.5 + 3 > 10
    assert w.tick() == "refused"
    assert w.calls == [] and w.actions() == ["retrain.refused"]
    assert w.audit.entries()[0]["details"]["reported_epsilon"] == 7.5
    w.sig.eps = 7.0  # exactly at budget after the run: allowed, once the cooldown passed
    assert w.tick() == "cooldown"
    assert w.tick(100.0) == "retrained"


def test_failed_run_is_audited_and_streak_resets(tmp_path: Path) -> None:
    w = World(tmp_path, fail_run=True, sustain_evaluations=1)
    w.sig.hot = set(w.sig.devices)
    with pytest.raises(EdgefleetError):
        w.tick()
    assert w.actions() == ["retrain.trigger", "retrain.run_started", "retrain.run_failed"]
    assert w.tick() == "cooldown"


def test_approval_gating(tmp_path: Path) -> None:
    w = World(tmp_path, sustain_evaluations=1, require_approval=True)
    w.sig.hot = set(w.sig.devices)
    assert w.tick() == "awaiting_approval"
    assert w.tick() == "awaiting_approval"  # still the one request
    pending = w.ctl.approvals.rows("pending")
    assert len(pending) == 1 and w.calls == []
    rid = pending[0]["id"]
    with pytest.raises(UsageError):
        decide(w.ctl.approvals, w.audit, "nope", True, "alice")
    decide(w.ctl.approvals, w.audit, rid, True, "alice")
    with pytest.raises(UsageError):
        decide(w.ctl.approvals, w.audit, rid, False, "bob")  # already decided
    assert w.tick() == "retrained" and w.calls[0] == ("run", "lab")
    assert w.ctl.approvals.rows()[0]["status"] == "done"
    acts = w.actions()
    assert acts[:3] == ["retrain.trigger", "retrain.approval_requested", "retrain.approved"]
    assert w.audit.entries()[2]["actor"] == "alice"
    assert w.audit.entries()[3]["details"]["request"] == rid  # run_started names the request


def test_denied_request_resets(tmp_path: Path) -> None:
    w = World(tmp_path, sustain_evaluations=1, require_approval=True, cooldown_seconds=0.0)
    w.sig.hot = set(w.sig.devices)
    assert w.tick() == "awaiting_approval"
    rid = w.ctl.approvals.rows("pending")[0]["id"]
    decide(w.ctl.approvals, w.audit, rid, False, "alice")
    assert w.tick() == "denied" and w.calls == []
    assert w.tick() == "awaiting_approval"  # a new request for the still-alerting group
    assert len(w.ctl.approvals.rows("pending")) == 1
    assert "retrain.denied" in w.actions()


def test_state_survives_a_new_controller(tmp_path: Path) -> None:
    """``--once`` from cron: each evaluation is a new process."""
    w = World(tmp_path)
    w.sig.hot = set(w.sig.devices)
    w.tick()
    w.tick()
    w2 = World(tmp_path)
    w2.sig.hot = set(w2.sig.devices)
    assert w2.tick() == "retrained"


def test_policy_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        RetrainPolicy(min_share=0)
    with pytest.raises(ValueError):
        RetrainPolicy.model_validate({"sustain_evaluatons": 2})  # typo: unknown key


def test_approvals_cli(tmp_path: Path) -> None:
    home = tmp_path / "reg"
    rid = Approvals(home / "retrain.db").request("lab", 1.0, {"alerting": ["a"], "devices": 2})
    out = run_cli("approvals", "--registry", str(home), "--json")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)["requests"]] == [rid]
    res = run_cli("approvals", "deny", rid, "--registry", str(home), "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["status"] == "denied"
    again = run_cli("approvals", "approve", rid, "--registry", str(home))
    assert again.returncode != 0 and "already denied" in again.stderr + again.stdout
    assert "Traceback" not in again.stderr
    assert AuditLog(home / "audit.jsonl").entries()[-1]["action"] == "retrain.denied"
