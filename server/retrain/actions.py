"""The real parts behind :class:`~edgefleet.server.retrain.policy.RetrainController`.

Signals come from the telemetry store (open alerts, reported ε) and the fleet's device
table (group membership); the run is ``edgefleet train --superlink ... --json`` against
the fleet's SuperLink (each device's privacy ledger declines a round past its budget);
the push signs into the registry; the canary is :class:`RolloutController` watching the
devices' update states, so its automatic stop is the one ``edgefleet rollout`` has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.server.registry.repository import Registry
from edgefleet.server.retrain.policy import (
    Canary,
    CanaryOutcome,
    Promote,
    Push,
    RetrainPolicy,
    RunOutcome,
)
from edgefleet.server.rollout.controller import RolloutController
from edgefleet.server.rollout.fleet_view import FleetView
from edgefleet.server.telemetry.store import Store

__all__ = ["RetrainError", "StoreSignals", "TrainCommand", "canary_with", "promote_with",
           "push_with"]

BIN = Path(sys.executable).parent


class RetrainError(EdgefleetError):
    """A retraining step (run, τ, push) failed; the message names it."""

    exit_code = 70


class StoreSignals:
    """Alerts and ε from the store; members from the fleet home (else: every stored device)."""

    def __init__(self, store: Store, fleet_home: Path | None = None) -> None:
        self.store = store
        self.fleet_home = fleet_home

    def members(self, group: str) -> list[str]:
        """Active enrolled devices of ``group``."""
        if self.fleet_home is None:
            return sorted(d["device"] for d in self.store.devices())
        from edgefleet.server.fleet.home import FleetHome

        return [d.name for d in FleetHome(self.fleet_home).devices.active() if d.group == group]

    def alerting(self, devices: list[str], kinds: list[str]) -> list[str]:
        """Devices of ``devices`` with an open alert of one of ``kinds``."""
        wanted = set(devices)
        return sorted({a["device"] for a in self.store.open_alerts()
                       if a["device"] in wanted and a["kind"] in kinds})

    def epsilon(self, devices: list[str]) -> float | None:
        """The highest ε reported by any of ``devices``."""
        wanted = set(devices)
        eps = [float(d["epsilon"]) for d in self.store.devices()
               if d["device"] in wanted and d.get("epsilon") is not None]
        return max(eps) if eps else None


def _json_cli(step: str, args: list[str], timeout: float) -> dict[str, Any]:
    try:
        res = subprocess.run([str(BIN / "edgefleet"), *args, "--json"], capture_output=True,
                             text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RetrainError(f"{step}: no result within {timeout:.0f} s") from None
    if res.returncode:
        lines = (res.stderr or res.stdout).strip().splitlines()
        raise RetrainError(f"{step} failed: {lines[-1] if lines else res.returncode}")
    try:
        out: dict[str, Any] = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        raise RetrainError(f"{step}: no JSON result") from None
    return out


class TrainCommand:
    """Runs ``edgefleet train`` on the fleet's SuperLink for a group; packages go to ``work``."""

    def __init__(self, work: Path, devices: int, registry: Path | None = None) -> None:
        self.work = work
        self.devices = devices
        #: Where ``base_model`` is registered (``edgefleet train --base``).
        self.registry = registry

    def __call__(self, group: str, p: RetrainPolicy) -> RunOutcome:
        """One federated run; τ against the cloud model if the policy names one."""
        if not p.superlink:
            raise RetrainError("retrain: the policy has no superlink (host:port) to train on")
        tag = f"{group}-{uuid.uuid4().hex[:8]}"
        out = self.work / "packages" / tag
        args = ["train", "--task", p.task, "--rounds", str(p.rounds), "--dp", p.dp,
                "--epsilon", str(p.epsilon), "--devices", str(max(self.devices, p.min_nodes)),
                "--min-nodes", str(p.min_nodes), "--superlink", p.superlink, "--format", "onnx",
                "--pretrain-epochs", str(p.pretrain_epochs), "--out", str(out),
                "--work-dir", str(self.work / "runs" / tag)]
        if p.root_certificates:
            args += ["--root-certificates", p.root_certificates]
        if p.base_model:
            args += ["--base", p.base_model]
            if self.registry is not None:
                args += ["--registry", str(self.registry)]
        res = _json_cli("federated run", args, p.run_timeout)
        if not res.get("package"):
            raise RetrainError("federated run finished without a model package")
        if p.cloud_package:
            _json_cli("choose τ", ["models", "cascade", res["package"], p.cloud_package], 300)
        final = res.get("final") or {}
        return RunOutcome(Path(res["package"]), final.get("accuracy"), final.get("epsilon"))


def push_with(registry: Registry) -> Push:
    """A push callable: sign the package into ``registry``; returns (model, version)."""
    def push(package: Path) -> tuple[str, str]:
        rec = registry.push(package, actor="retrain-policy")
        return rec.name, rec.version
    return push


def canary_with(ctl: RolloutController, view: FleetView) -> Canary:
    """A canary callable: start on ``canary_percent`` of the devices, watch, maybe auto-stop."""
    def canary(model: str, version: str, p: RetrainPolicy) -> CanaryOutcome:
        r = ctl.start(model, version, fleet=view.fleet(1.0), canary_pct=p.canary_percent,
                      threshold=p.canary_threshold, actor="retrain-policy")
        if p.canary_watch_seconds > 0:
            r = ctl.watch(r, p.canary_watch_seconds)
        return CanaryOutcome(r.id, r.status, list(r.devices), r.reason)
    return canary


def promote_with(ctl: RolloutController) -> Promote:
    """A promote callable."""
    def promote(model: str) -> None:
        ctl.promote(model, actor="retrain-policy")
    return promote
