"""``edgefleet rollout`` / ``promote`` / ``rollback``: who runs which model version.

Assignments are retained MQTT messages (see docs/updates.md); devices fetch and verify
the named version through TUF themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgefleet.device.cli_support import console, print_json
from edgefleet.device.errors import UsageError
from edgefleet.server.cli.registry_cmd import HOME, open_registry

if TYPE_CHECKING:
    from edgefleet.server.rollout import FleetView, RolloutController

__all__ = ["promote", "register", "rollback", "rollout"]

BROKER = typer.Option("127.0.0.1:1883", "--broker", envvar="EDGEFLEET_BROKER",
                      help="MQTT broker host:port the devices listen on (credentials: "
                           "$EDGEFLEET_MQTT_USERNAME, $EDGEFLEET_MQTT_PASSWORD).")


def _controller(home: Path, broker: str) -> tuple[RolloutController, FleetView]:
    from edgefleet.server.rollout import FleetView, RolloutController

    host, _, port = broker.rpartition(":")
    try:
        view = FleetView(host or "127.0.0.1", int(port),
                         username=os.environ.get("EDGEFLEET_MQTT_USERNAME"),
                         password=os.environ.get("EDGEFLEET_MQTT_PASSWORD"))
    except ValueError:
        raise UsageError(f"--broker {broker!r}: expected HOST:PORT") from None
    return RolloutController(open_registry(home), view, view), view


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
    broker: str = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Assign a registered model version to a canary, devices, a group or the fleet.

    Examples:
      edgefleet rollout digits-mlp@1.1.0 --canary 10% --watch 600
      edgefleet rollout digits-mlp@1.1.0 --devices pi-01,pi-02 --shadow
      edgefleet rollout digits-mlp@1.1.0 --group lab
    """
    from edgefleet.server.registry import parse_ref

    model, version = parse_ref(ref)
    ctl, view = _controller(home, broker)
    try:
        r = ctl.start(model, version, fleet=view.fleet(1.0),
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
    broker: str = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Promote the running canary of MODEL to every device.

    Example: edgefleet promote digits-mlp
    """
    ctl, view = _controller(home, broker)
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
    broker: str = BROKER,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Stop MODEL's running canary, or return the fleet to the version before the last promotion.

    Example: edgefleet rollback digits-mlp
    """
    ctl, view = _controller(home, broker)
    try:
        r = ctl.rollback(model)
    finally:
        view.close()
    if json_out:
        print_json(r.as_dict())
    else:
        console.print(f"rolled back {model}@{r.version}: {r.reason}")


def register(app: typer.Typer) -> None:
    """Add the three top-level commands to ``app``."""
    app.command("rollout")(rollout)
    app.command("promote")(promote)
    app.command("rollback")(rollback)
