"""``edgefleet retrain watch`` and ``edgefleet approvals``: drift-triggered retraining.

See docs/retraining.md for the policy and its ``[retrain]`` config section.
"""

from __future__ import annotations

import getpass
import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.home_opts import parse_broker
from edgefleet.server.cli.registry_cmd import HOME
from edgefleet.server.cli.rollout_cmd import BROKER, _view

__all__ = ["approvals_app", "retrain_app"]

retrain_app = typer.Typer(help="Retrain a group when its alerts stay up (docs/retraining.md).",
                          no_args_is_help=True)
approvals_app = typer.Typer(help="Retraining requests waiting for an operator.",
                            invoke_without_command=True)


@retrain_app.command()
def watch(
    group: str = typer.Option(..., "--group", help="Device group to watch and retrain."),
    db: str = typer.Option(..., "--db", help="Telemetry store (path or DSN) of `ingest run`."),
    config: Path | None = typer.Option(None, "--config", help="TOML with a [retrain] table."),
    fleet: Path | None = typer.Option(None, "--fleet",
                                      help="Fleet home (group membership); without it every "
                                           "device in the store is the group."),
    home: Path = HOME,
    broker: str | None = BROKER,
    superlink: str | None = typer.Option(None, "--superlink", help="Overrides retrain.superlink."),
    root_certificates: Path | None = typer.Option(None, "--root-certificates",
                                                  help="Overrides retrain.root_certificates."),
    interval: float = typer.Option(30.0, "--interval", min=0.1, help="Seconds between checks."),
    once: bool = typer.Option(False, "--once", help="Evaluate once and exit (tests, cron)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (with --once)."),
) -> None:
    """Evaluate the group's alerts every --interval s; retrain when they are sustained.

    Examples:

      edgefleet retrain watch --group lab --db fleet.db --config retrain.toml --fleet fleet/

      edgefleet retrain watch --group lab --db fleet.db --once --json      (from cron)
    """
    from edgefleet.device.core.config import load_config
    from edgefleet.server.cli.registry_cmd import open_registry
    from edgefleet.server.retrain.actions import (
        StoreSignals,
        TrainCommand,
        canary_with,
        promote_with,
        push_with,
    )
    from edgefleet.server.retrain.policy import APPROVALS_DB, RetrainConfig, RetrainController
    from edgefleet.server.rollout.controller import RolloutController
    from edgefleet.server.rollout.fleet_view import FleetView
    from edgefleet.server.rollout.health import CombinedHealth, StoreHealthSource
    from edgefleet.server.telemetry.store import open_store

    if broker:
        parse_broker(broker)  # a typo fails now, not at the first canary
    over: dict[str, Any] = {}
    if superlink:
        over["superlink"] = superlink
    if root_certificates:
        over["root_certificates"] = str(root_certificates.resolve())
    cfg = load_config(RetrainConfig, [config] if config else [])
    policy = cfg.retrain.model_copy(update=over)
    registry = open_registry(home)
    home = registry.home
    store = open_store(db)
    signals = StoreSignals(store, fleet)
    view: FleetView | None = None

    def fleet_view() -> FleetView:
        nonlocal view
        if view is None:  # the operator's view, as `rollout` opens it
            view = _view(broker, fleet)
        return view

    def rollout_ctl() -> RolloutController:
        v = fleet_view()
        ctl = RolloutController(registry, v)
        ctl.health = CombinedHealth(v, StoreHealthSource(store, ctl.ledger))
        return ctl

    def canary(model: str, version: str, p: Any) -> Any:
        return canary_with(rollout_ctl(), fleet_view())(model, version, p)

    def promote(model: str) -> None:
        promote_with(rollout_ctl())(model)

    ctl = RetrainController(
        policy, group, signals=signals, audit=registry.audit, state=home / APPROVALS_DB,
        start_run=TrainCommand(home / "retrain", len(signals.members(group)), registry.home),
        push=push_with(registry), canary=canary, promote=promote)
    try:
        while True:
            ev = ctl.evaluate()
            if once and json_out:
                print_json(ev.as_dict())
            else:
                console.print(f"{time.strftime('%H:%M:%S')} {group}: {ev.action} "
                              f"({ev.alerting}/{ev.devices} alerting, streak {ev.streak}) "
                              f"{ev.detail or ''}")
            if once:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if view is not None:
            view.close()
        store.close()


@approvals_app.callback()
def pending(
    ctx: typer.Context,
    home: Path = HOME,
    all_: bool = typer.Option(False, "--all", help="Decided requests too."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List retraining requests waiting for approval (policy with require_approval = true).

    Examples:

      edgefleet approvals

      edgefleet approvals approve 3f2a9c01de

      edgefleet approvals deny 3f2a9c01de
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgefleet.server.cli.home_opts import registry_path
    from edgefleet.server.retrain.policy import APPROVALS_DB, Approvals

    rows = Approvals(registry_path(home, None) / APPROVALS_DB).rows(None if all_ else "pending")
    if json_out:
        print_json({"requests": rows})
        return
    if not rows:
        console.print("no retraining requests pending")
    for r in rows:
        d = r["details"]
        console.print(f"{r['id']}  group {r['group']}  {r['status']}  "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['created']))}  "
                      f"{len(d.get('alerting', []))}/{d.get('devices', '?')} devices alerting")


def _decide(rid: str, home: Path | None, approve: bool, json_out: bool) -> None:
    from edgefleet.server.cli.home_opts import registry_path
    from edgefleet.server.fleet.audit import AuditLog
    from edgefleet.server.retrain.policy import APPROVALS_DB, Approvals, decide

    home = registry_path(home, None)
    row = decide(Approvals(home / APPROVALS_DB), AuditLog(home / "audit.jsonl"), rid, approve,
                 getpass.getuser())
    if json_out:
        print_json(row)
    else:
        console.print(f"request {rid} ({row['group']}): {row['status']}")


@approvals_app.command()
def approve(
    rid: str = typer.Argument(..., help="Request id from `edgefleet approvals`."),
    home: Path = HOME,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Approve a retraining request; the next `retrain watch` evaluation runs it."""
    _decide(rid, home, True, json_out)


@approvals_app.command()
def deny(
    rid: str = typer.Argument(..., help="Request id from `edgefleet approvals`."),
    home: Path = HOME,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Deny a retraining request; the group's streak starts again from zero."""
    _decide(rid, home, False, json_out)
