"""The dashboard's actions: each is the call the matching CLI command makes, with the
signed-in user as the audit log's actor (``dashboard:<user>``)."""

from __future__ import annotations

from typing import Any

from edgefleet.server.dashboard.views import Sources

__all__ = ["acknowledge_alert", "actor_of", "decide_request", "promote", "rollback"]


def actor_of(user: str) -> str:
    """The audit actor of a dashboard user."""
    return f"dashboard:{user}"


def acknowledge_alert(src: Sources, user: str, device: str, kind: str) -> dict[str, Any]:
    """``edgefleet alerts --ack DEVICE:KIND``."""
    from edgefleet.server.telemetry.alerts import acknowledge

    return acknowledge(src.store, src.audit(), device, kind, actor_of(user))


def decide_request(src: Sources, user: str, rid: str, approve: bool) -> dict[str, Any]:
    """``edgefleet approvals approve|deny RID``."""
    from edgefleet.server.retrain.policy import APPROVALS_DB, Approvals, decide

    if src.registry is None:
        raise RuntimeError("no registry: no retraining requests")
    approvals = Approvals(src.registry / APPROVALS_DB)
    try:
        return decide(approvals, src.audit(), rid, approve, actor_of(user))
    finally:
        approvals.db.close()


def _with_controller(src: Sources, user: str, op: str, model: str) -> dict[str, Any]:
    if src.controller is None:
        raise RuntimeError("no registry: no rollouts")
    ctl, view = src.controller()
    try:
        fn = ctl.promote if op == "promote" else ctl.rollback
        return fn(model, actor=actor_of(user)).as_dict()
    finally:
        view.close()
        ctl.close()


def promote(src: Sources, user: str, model: str) -> dict[str, Any]:
    """``edgefleet promote MODEL``."""
    return _with_controller(src, user, "promote", model)


def rollback(src: Sources, user: str, model: str) -> dict[str, Any]:
    """``edgefleet rollback MODEL``."""
    return _with_controller(src, user, "rollback", model)
