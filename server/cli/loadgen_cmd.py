"""``edgefleet loadgen``: drive N enrolled virtual devices against the real broker."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.fleet_cmd import db_option
from edgefleet.server.cli.home_opts import BROKER_CA_OPTION, HOME_OPTION

__all__ = ["loadgen"]


def loadgen(
    devices: int = typer.Option(100, "--devices", "-n", min=1,
                                help="Virtual devices, each enrolled in the fleet home "
                                     "(<prefix>00000, ...) and on its own connection."),
    rate: float = typer.Option(100.0, "--rate", min=0.001,
                               help="Messages per second over all devices."),
    duration: float = typer.Option(10.0, "--duration", min=0.001,
                                   help="Seconds of sending (sets the messages per device)."),
    per_device: int | None = typer.Option(None, "--per-device", min=1,
                                          help="Messages per device (overrides --duration)."),
    home: Path | None = HOME_OPTION,
    broker: str | None = typer.Option(
        None, "--broker", help="Broker HOST:PORT the devices dial (default: the fleet "
                               "home's broker_host:broker_port, as in their bundles)."),
    broker_ca: Path | None = BROKER_CA_OPTION,
    db: str | None = db_option(),
    prefix: str = typer.Option("lg-", "--prefix",
                               help="Device names: <prefix>00000, <prefix>00001, ..."),
    processes: int | None = typer.Option(None, "--processes", min=1,
                                         help="Processes sharing the devices (default: one "
                                              "per 300 devices, at least one per core)."),
    window: int = typer.Option(20, "--window", min=1,
                               help="Messages each device keeps in flight."),
    connect_timeout: float = typer.Option(30.0, "--connect-timeout", min=0.1,
                                          help="Every device must connect within this "
                                               "many seconds, or the run stops (and says "
                                               "why: e.g. a broker not yet reloaded)."),
    settle: float = typer.Option(60.0, "--settle", min=0,
                                 help="Seconds to wait for the store to catch up."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Load-test telemetry: N virtual devices, the real format, credentials and ACLs.

    Each virtual device is enrolled through the fleet's own enrollment (a broker account
    and ACL entry; the bundle goes to <home>/bundles/<name> and is reused next time),
    connects as itself to the fleet's device-facing broker, and sends metrics messages
    in the wire format with (device, boot, seq), re-sending what is unacknowledged after
    a reconnect, as the agent does. Run it against the fleet while `edgefleet ingest run`
    (or `server up`) is storing, then read the report:

      sent            messages the devices produced
      acked           PUBACKed by the broker (no_subscribers: of those, how many the
                      broker accepted with "no matching subscribers": nobody read them)
      stored          rows in the store for this run's (device, boot) pairs
      lost            sent - stored (after waiting --settle seconds)
      duplicated      rows stored twice (UNIQUE (device, boot, seq) forbids it)
      deduplicated    redeliveries the ingest dropped (normal after restarts)

    Exits 1 when anything was lost or duplicated.

    Example: edgefleet loadgen --home /srv/edgefleet/fleet -n 1000 --rate 500 --duration 60
    """
    import os

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.cli.home_opts import fleet_home, parse_broker, store_target
    from edgefleet.server.telemetry.loadgen import (
        MAX_DEVICES_PER_PROCESS,
        LoadConfig,
        enroll_devices,
        run_load,
        settle_store,
    )
    from edgefleet.server.telemetry.store import open_store

    fh = fleet_home(home)
    if fh is None:
        raise UsageError("loadgen enrolls its devices: give a fleet home (--home or "
                         "$EDGEFLEET_HOME; `edgefleet fleet init` makes one)")
    s = fh.settings
    host, port = parse_broker(broker) if broker else (s.broker_host, s.broker_port)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    n_msgs = per_device or max(1, round(rate * duration / devices))
    cfg = LoadConfig(host=host, port=port, messages=n_msgs, rate=rate, window=window,
                     ca_file=broker_ca or s.broker_ca, connect_timeout=connect_timeout)
    procs = processes or max(-(-devices // MAX_DEVICES_PER_PROCESS),
                             min(os.cpu_count() or 1, devices))
    columns = (TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
               TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=json_out, transient=False) as bar:
        t_enroll = bar.add_task("enroll", total=devices)
        fleet = enroll_devices(fh, devices, prefix,
                               progress=lambda i: bar.update(t_enroll, completed=i))
        total = devices * n_msgs
        t_sent = bar.add_task("sent", total=total)
        t_acked = bar.add_task("acked", total=total)

        def _sent(sent: int, acked: int) -> None:
            bar.update(t_sent, completed=sent)
            bar.update(t_acked, completed=acked)

        report = run_load(fleet, cfg, processes=procs, progress=_sent)
        _sent(report.sent, report.acked + report.refused)
        store = open_store(store_target(db, home, must_exist=False))
        try:
            t_stored = bar.add_task("stored", total=report.sent)
            settle_store(store, report, settle,
                         progress=lambda n: bar.update(t_stored, completed=n))
        finally:
            store.close()
    totals = report.totals()
    if json_out:
        print_json(totals)
    else:
        console.print(
            f"{report.devices} devices, {report.sent} sent in {report.seconds:.1f} s "
            f"({totals['rate']}/s), {report.acked} acked ({report.no_subscribers} with no "
            f"matching subscribers), {report.refused} refused, {report.resent} re-sent "
            f"after reconnects; stored {report.stored}, lost {report.lost}, duplicated "
            f"{report.duplicated}, deduplicated {report.deduplicated}")
    if report.lost or report.duplicated:
        raise typer.Exit(1)
