"""``edgefleet rollout`` / ``rollout guard`` / ``promote`` / ``rollback``: who runs which version.

Assignments are retained MQTT messages (see docs/updates.md); devices fetch and verify
the named version through TUF themselves. ``edgefleet rollout MODEL@VERSION ...`` is
``edgefleet rollout start MODEL@VERSION ...``; ``edgefleet rollout guard`` is the service
that stops unhealthy canaries when nobody is watching (docs/operations.md).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import typer
from typer.core import TyperGroup

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.home_opts import HOME_OPTION, parse_broker
from edgefleet.server.cli.metrics_cmd import (
    METRICS_HOST_OPTION,
    METRICS_PORT_OPTION,
    start_metrics,
)
from edgefleet.server.cli.registry_cmd import HOME, open_registry

if TYPE_CHECKING:
    from edgefleet.server.rollout.controller import RolloutController
    from edgefleet.server.rollout.fleet_view import FleetView

__all__ = ["guard", "promote", "register", "rollback", "rollout", "rollout_app"]


class _StartByDefault(TyperGroup):
    """``rollout MODEL@VERSION ...`` means ``rollout start MODEL@VERSION ...``.

    A reference always holds an ``@``, so it can never be mistaken for a subcommand name.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["start", *args]
        return super().parse_args(ctx, args)


rollout_app = typer.Typer(
    cls=_StartByDefault, no_args_is_help=True,
    help="Roll a model version out (`edgefleet rollout MODEL@VERSION --canary 10%` is "
         "`rollout start`), or guard running canaries (`rollout guard`).")

BROKER = typer.Option(None, "--broker", envvar="EDGEFLEET_BROKER",
                      help="MQTT broker HOST:PORT (default: the fleet home's loopback "
                           "listener with the operator account; else 127.0.0.1:1883 with "
                           "$EDGEFLEET_MQTT_USERNAME, $EDGEFLEET_MQTT_PASSWORD).")


def _view(broker: str | None, fleet: Path | None = None) -> FleetView:
    """The operator's view of the fleet: the home's operator account unless overridden."""
    from edgefleet.server.cli.home_opts import mqtt_for
    from edgefleet.server.rollout.fleet_view import FleetView

    if broker:
        parse_broker(broker)  # a typo fails before anything is opened
    cfg = mqtt_for("operator", fleet, broker=broker)
    return FleetView(cfg.host, cfg.port, username=cfg.username, password=cfg.secret())


def _controller(home: Path | None, broker: str | None,
                fleet: Path | None = None) -> tuple[RolloutController, FleetView]:
    from edgefleet.server.rollout.controller import RolloutController

    reg = open_registry(home, fleet=fleet)
    view = _view(broker, fleet)
    # Assignments are signed per device: wait for the retained states that say who is in
    # the fleet (and the seq each device took) before anything is signed.
    view.fleet(1.0)
    return RolloutController(reg, view, view), view


def _percent(text: str) -> float:
    try:
        return float(text.strip().rstrip("%"))
    except ValueError:
        raise UsageError(f"--canary {text!r}: expected a percentage such as 10%") from None


def rollout(
    ref: str = typer.Argument(..., help="MODEL@VERSION to roll out."),
    canary: str | None = typer.Option(None, help="Share of known devices, e.g. 10%."),
    devices: str | None = typer.Option(None, help="Comma-separated device ids."),
    group: str | None = typer.Option(None, help="A device group."),
    fleet: bool = typer.Option(False, "--fleet", help="Every device at once."),
    shadow: bool = typer.Option(False, help="Run beside the active model; answers unchanged."),
    threshold: float = typer.Option(0.2, help="Stop the canary when the candidate's "
                                               "error+degraded+fallback rate passes this."),
    watch: float = typer.Option(0.0, help="Watch the canary this many seconds (auto-stop)."),
    home: Path = HOME,
    fleet_home: Path | None = HOME_OPTION,
    broker: str | None = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Assign a registered model version to a canary, devices, a group or the fleet.

    Examples:
      edgefleet rollout digits-mlp@1.1.0 --canary 10% --watch 600
      edgefleet rollout digits-mlp@1.1.0 --devices pi-01,pi-02 --shadow
      edgefleet rollout digits-mlp@1.1.0 --group lab
    """
    from edgefleet.server.cli.registry_cmd import registered_tau, warn_no_tau
    from edgefleet.server.registry.repository import parse_ref

    model, version = parse_ref(ref)
    reg = open_registry(home, fleet=fleet_home)
    try:
        rec = reg.get(model, version)
        if rec is not None and not rec.encrypted and registered_tau(reg, rec.sha256) is None:
            warn_no_tau(ref)
    finally:
        reg.close()
    ctl, view = _controller(home, broker, fleet_home)
    try:
        r = ctl.start(model, version, fleet=view.fleet(0.0),
                      canary_pct=_percent(canary) if canary else None,
                      devices=[d for d in (devices or "").split(",") if d] or None,
                      group=group, everyone=fleet, shadow=shadow, threshold=threshold)
        if watch > 0:
            r = ctl.watch(r, watch)
    finally:
        view.close()
    if json_out:
        print_json(r.as_dict())
    else:
        console.print(f"rollout {r.id}: {model}@{version} {r.mode} -> "
                      f"{', '.join(r.devices) or r.group or 'fleet'} [{r.status}]"
                      + (f" ({r.reason})" if r.reason else ""))


def promote(
    model: str = typer.Argument(..., help="Model whose running rollout becomes fleet-wide."),
    home: Path = HOME,
    fleet_home: Path | None = HOME_OPTION,
    broker: str | None = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Promote the running canary of MODEL to every device.

    Example: edgefleet promote digits-mlp
    """
    ctl, view = _controller(home, broker, fleet_home)
    try:
        r = ctl.promote(model)
    finally:
        view.close()
    if json_out:
        print_json(r.as_dict())
    else:
        console.print(f"promoted {model}@{r.version} to the fleet")


def rollback(
    model: str = typer.Argument(..., help="Model to roll back."),
    home: Path = HOME,
    fleet_home: Path | None = HOME_OPTION,
    broker: str | None = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Stop MODEL's running canary, or return the fleet to the version before the last promotion.

    Example: edgefleet rollback digits-mlp
    """
    ctl, view = _controller(home, broker, fleet_home)
    try:
        r = ctl.rollback(model)
    finally:
        view.close()
    if json_out:
        print_json(r.as_dict())
    else:
        console.print(f"rolled back {model}@{r.version}: {r.reason}")


def guard(
    interval: float = typer.Option(10.0, "--interval", min=0.1,
                                   help="Seconds between passes over the running canaries."),
    once: bool = typer.Option(False, "--once", help="One pass, then exit (cron, tests)."),
    db: str | None = typer.Option(None, "--db", envvar="EDGEFLEET_DB",
                                  help="Telemetry store of `ingest run`: health for devices "
                                       "whose update state says nothing."),
    min_inferences: int = typer.Option(20, "--min-inferences", min=1,
                                       help="Judge a device's rate only after this many "
                                            "inferences on the candidate."),
    home: Path = HOME,
    fleet_home: Path | None = HOME_OPTION,
    broker: str | None = BROKER,
    json_out: bool = typer.Option(False, "--json", help="With --once: one JSON object; "
                                  "else one JSON line per pass."),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
) -> None:
    """Stop every running canary that turns unhealthy, also when no --watch is running.

    Runs until SIGTERM/SIGINT; waits out a vanished broker. The stop is the one
    `rollout --watch` makes (devices back on their previous version, an audit entry with
    actor rollout-guard); restarts and a second guard neither lose track nor stop twice.

    Examples:

      edgefleet rollout guard --registry registry/ --broker 127.0.0.1:1883 --db fleet.db

      edgefleet rollout guard --once --json          (from cron)
    """
    from edgefleet.server.cli.home_opts import fleet_home as find_fleet_home
    from edgefleet.server.cli.home_opts import store_target
    from edgefleet.server.rollout.guard import GuardPass, RolloutGuard
    from edgefleet.server.telemetry.store import open_store

    if broker:
        parse_broker(broker)  # a typo fails before anything is opened
    reg = open_registry(home, fleet=fleet_home)
    fh = find_fleet_home(fleet_home)
    if db is None and fh is not None:  # the home's store, once the ingest has made it
        db = fh.store_target if "://" in fh.store_target or Path(
            fh.store_target).exists() else None
    store = open_store(store_target(db, fleet_home)) if db else None
    g = RolloutGuard(reg, lambda: _view(broker, fleet_home), store=store,
                     interval=interval, min_inferences=min_inferences)

    def report(p: GuardPass) -> None:
        if json_out and once:
            print_json(p.as_dict())
            return
        if json_out:  # a service: one compact line per pass (JSON Lines)
            sys.stdout.write(json.dumps(p.as_dict(), sort_keys=True) + "\n")
            sys.stdout.flush()
            return
        running = sum(1 for c in p.checked if c["status"] == "running")
        console.print(f"{time.strftime('%H:%M:%S')} {len(p.checked)} checked, "
                      f"{running} running, {len(p.stopped)} stopped"
                      + "".join(f"\n  stopped {c['id']} {c['model']}@{c['version']}: "
                                f"{c['reason']}" for c in p.checked if c["id"] in p.stopped))

    def _stop(*_: Any) -> None:
        g.stop()

    try:
        if once:
            report(g.run_pass())
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop)
        endpoint = start_metrics(metrics_port, metrics_host, g.metrics, quiet=json_out)
        if not json_out:
            console.print(f"guarding the running canaries of {reg.home} every "
                          f"{interval:g} s; Ctrl-C to stop")
        g.run(report)
        if endpoint is not None:
            endpoint.close()
    finally:
        g.close()
        if store is not None:
            store.close()
    if not json_out:
        console.print(f"stopped after {g.passes} passes ({g.failures} failed)")


def register(app: typer.Typer) -> None:
    """Add ``rollout`` (start, guard), ``promote`` and ``rollback`` to ``app``."""
    rollout_app.command("start")(rollout)
    rollout_app.command("guard")(guard)
    app.add_typer(rollout_app, name="rollout")
    app.command("promote")(promote)
    app.command("rollback")(rollback)
