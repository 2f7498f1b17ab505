"""``edgefleet devices enroll|ls|revoke|sync|logs`` and ``edgefleet fleet init``: who may join.

Every command takes ``--home`` (default ``$EDGEFLEET_HOME``, else
``~/.local/share/edgefleet``), the fleet home that ``fleet init`` creates.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["app", "fleet_init"]

app = typer.Typer(help="Enroll devices (credentials, keys, bundles), list and revoke them.",
                  no_args_is_help=True)


def _home_option() -> Any:
    return typer.Option(None, "--home", envvar="EDGEFLEET_HOME",
                        help="Fleet home folder [default: ~/.local/share/edgefleet].")


def _open(home: Path | None) -> Any:
    from edgefleet.server.fleet.home import FleetHome

    return FleetHome(home)


def _host_port(value: str, what: str) -> tuple[str, int]:
    from edgefleet.server.cli.home_opts import parse_broker

    return parse_broker(value, what)


def fleet_init(
    home: Path | None = _home_option(),
    broker: str = typer.Option("127.0.0.1:1883", "--broker", help="Broker HOST:PORT devices use."),
    broker_ca: Path | None = typer.Option(None, "--broker-ca", help="CA of the broker's TLS "
                                                                    "certificate (turns TLS on)."),
    broker_pid_file: Path | None = typer.Option(
        None, "--broker-pid-file", help="mosquitto's pid file; enroll/revoke SIGHUP it "
                                        "(Debian: /run/mosquitto/mosquitto.pid)."),
    superlink: str | None = typer.Option(None, "--superlink", help="SuperLink HOST:PORT."),
    superlink_ca: Path | None = typer.Option(None, "--superlink-ca",
                                             help="CA of the SuperLink (edgefleet certs init)."),
    metadata_url: str = typer.Option("", "--metadata-url", help="Registry TUF metadata URL."),
    targets_url: str = typer.Option("", "--targets-url", help="Registry targets URL."),
    trusted_root: Path | None = typer.Option(None, "--trusted-root",
                                             help="root.json to pin (edgefleet registry root)."),
    registry_ca: Path | None = typer.Option(None, "--registry-ca",
                                            help="CA of the registry's HTTPS certificate "
                                                 "(the fleet CA: certs/ca.pem)."),
    certs: Path | None = typer.Option(
        None, "--certs", help="Folder of `edgefleet certs init` (+ `certs issue registry`, "
        "`certs issue broker`): its ca.pem becomes the default of --broker-ca, "
        "--superlink-ca and --registry-ca, and `server up` takes the servers' "
        "certificates from it."),
    registry: Path | None = typer.Option(None, "--registry", help="Model registry folder "
                                         "(default: <home>/registry)."),
    store: str | None = typer.Option(None, "--store", help="Fleet store, path or DSN "
                                     "(default: <home>/fleet.db)."),
    scorer_package: Path | None = typer.Option(None, "--scorer-package",
                                               help="Cloud model package `server up` "
                                                    "serves with a scorer."),
    listen: str = typer.Option("0.0.0.0", "--listen", help="Address the device-facing "
                               "listeners of `server up` bind to."),
    broker_local_port: int = typer.Option(1884, "--broker-local-port",
                                          help="The broker's loopback listener for the "
                                               "services (no TLS)."),
    broker_user: str | None = typer.Option(
        None, "--broker-user", help="User mosquitto drops to when the server runs as root "
        "(default: mosquitto, when that user exists and this runs as root)."),
    broker_dir: Path | None = typer.Option(
        None, "--broker-dir", help="Folder for the broker's files (default: <home>/broker); "
        "broker_user must be able to reach it."),
    update: bool = typer.Option(False, "--update", help="Change the settings of an existing "
                                                       "home (devices are kept)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create the fleet home: fleet.toml, service accounts and broker password/ACL files.

    Example:
        edgefleet fleet init --certs /srv/edgefleet/certs
        --broker mqtt.example.org:8883 --superlink fl.example.org:9092
        --metadata-url https://reg.example.org:8470/metadata/
        --targets-url https://reg.example.org:8470/targets/

    Then `edgefleet server up` runs every service from this home.
    """
    import os
    import pwd

    from edgefleet.device.core.config import registry_is_https
    from edgefleet.server.fleet.home import SERVICE_ROLES, FleetHome, default_root

    host, port = _host_port(broker, "--broker")
    if superlink:
        _host_port(superlink, "--superlink")
    if certs is not None:
        ca = certs / "ca.pem"
        broker_ca = broker_ca or ca
        superlink_ca = superlink_ca or (ca if superlink else None)
        if registry_is_https(metadata_url, targets_url):
            registry_ca = registry_ca or ca
    root = home or default_root()
    reg = registry or root / "registry"
    if metadata_url and trusted_root is None and (reg / "repo/metadata/1.root.json").is_file():
        trusted_root = reg / "repo/metadata/1.root.json"
    if broker_user is None and os.geteuid() == 0:
        try:
            broker_user = pwd.getpwnam("mosquitto").pw_name
        except KeyError:
            broker_user = None
    server = {"certs": certs, "registry": registry, "store": store,
              "scorer_package": scorer_package, "listen": listen,
              "broker_local_port": broker_local_port, "broker_user": broker_user,
              "broker_dir": broker_dir}
    h = FleetHome.create(home, update=update, broker_host=host, broker_port=port,
                         broker_ca=broker_ca, broker_pid_file=broker_pid_file,
                         superlink=superlink, superlink_ca=superlink_ca,
                         metadata_url=metadata_url, targets_url=targets_url,
                         trusted_root=trusted_root, registry_ca=registry_ca,
                         server={k: v for k, v in server.items() if v is not None})
    from edgefleet.server.fleet.broker import limit_lines

    files = h.broker_files()
    services = {r: str(h.root / "services" / f"{r}.password") for r in SERVICE_ROLES}
    info = {"home": str(h.root), "password_file": str(files.password_file),
            "acl_file": str(files.acl_file), "services": services,
            "broker_limits": limit_lines()}
    if json_out:
        print_json(info)
        return
    console.print(f"[green]fleet home[/] {h.root}")
    console.print(f"mosquitto: password_file {files.password_file}\n"
                  f"           acl_file {files.acl_file}")
    console.print("mosquitto bounds (sized from the protocols' maxima; add them too):\n"
                  + "\n".join(f"           {line}" for line in limit_lines()),
                  markup=False, highlight=False)
    console.print("service passwords: " + ", ".join(services.values()))
    console.print("start every service: edgefleet server up")


@app.command()
def enroll(
    name: str = typer.Argument(..., help="Device name (its MQTT user and telemetry id)."),
    group: str = typer.Option("default", "--group", "-g", help="Rollout group."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Bundle folder, or a .tar.gz "
                                    "[default: <home>/bundles/NAME]."),
    no_register: bool = typer.Option(False, "--no-register", help="Do not contact the "
                                     "SuperLink now (run `devices sync` later)."),
    home: Path | None = _home_option(),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Create a device's broker account and SuperNode key and write its bundle.

    Example: edgefleet devices enroll pi-07 --group line-2 --out pi-07.tar.gz

    Copy the bundle to the device over a trusted channel, then on the device:
    sudo edgefleet-agent enroll pi-07.tar.gz --state-dir /var/lib/edgefleet
    """
    from edgefleet.server.fleet.enrollment import enroll_device

    h = _open(home)
    conn = None if no_register else h.superlink_conn()
    bundle = enroll_device(h, name, group, out=out, superlink=conn)
    row = h.devices.get(name)
    if json_out:
        print_json({"bundle": str(bundle), "device": row.as_dict()})
        return
    console.print(f"[green]enrolled[/] {name} (group {group}); bundle {bundle} "
                  f"(secret: copy it to the device, then delete it)")
    if row.fl_state == "pending" and h.settings.superlink:
        console.print("SuperNode key not registered yet: run `edgefleet devices sync`")


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


@app.command("ls")
def ls(home: Path | None = _home_option(),
       json_out: bool = typer.Option(False, "--json", help="One JSON object: {devices: [...]}."),
       ) -> None:
    """List enrolled devices (revoked ones too) with their SuperLink state.

    Example: edgefleet devices ls --json
    """
    from rich.table import Table

    rows = _open(home).devices.all()
    if json_out:
        print_json({"devices": [r.as_dict() for r in rows]})
        return
    from rich import box

    t = Table(title=f"{sum(r.active for r in rows)} enrolled, "
                    f"{sum(not r.active for r in rows)} revoked", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("device", "group", "enrolled", "revoked", "SuperNode", "node id"):
        t.add_column(col, no_wrap=col in ("device", "node id"))
    for r in rows:
        t.add_row(r.name, r.group, _when(r.enrolled_at), _when(r.revoked_at), r.fl_state,
                  "-" if r.node_id is None else str(r.node_id))
    console.print(t)


@app.command()
def revoke(name: str = typer.Argument(..., help="Device name."),
           home: Path | None = _home_option(),
           json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")
           ) -> None:
    """Cut a device off the broker and the SuperLink.

    Removes its broker account (and SIGHUPs the broker when broker_pid_file is set) and
    unregisters its SuperNode key from the SuperLink.

    Example: edgefleet devices revoke pi-07
    """
    from edgefleet.server.fleet.enrollment import revoke_device

    h = _open(home)
    revoke_device(h, name, superlink=h.superlink_conn())
    row = h.devices.get(name)
    if json_out:
        print_json({"device": row.as_dict()})
        return
    console.print(f"[red]revoked[/] {name}; SuperNode {row.fl_state}")


@app.command()
def sync(home: Path | None = _home_option(),
         json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Register pending SuperNode keys and unregister revoked ones on the SuperLink.

    Example: edgefleet devices sync
    """
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.fleet.enrollment import register_pending

    h = _open(home)
    conn = h.superlink_conn()
    if conn is None:
        raise UsageError("no SuperLink configured (edgefleet fleet init --update --superlink)")
    done = register_pending(h, conn)
    if json_out:
        print_json({"synced": done})
        return
    console.print(f"synced {len(done)} device(s): {', '.join(done) or '-'}")


def parse_since(value: str) -> float:
    """``90``, ``30s``, ``10m``, ``2h``, ``1d`` as seconds (positive): ``fleet prune``'s
    ages (:func:`~edgefleet.server.telemetry.retention.parse_age`)."""
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.telemetry.retention import parse_age

    try:
        return parse_age(value)
    except UsageError as exc:
        raise UsageError(f"--since: {exc}") from None


@app.command()
def logs(
    device: str = typer.Argument(..., help="Device name."),
    since: str | None = typer.Option(None, "--since", help="Only lines of the last 30s, "
                                     "10m, 2h, 1d (the device's clock)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines "
                                "until interrupted."),
    lines: int = typer.Option(200, "--lines", "-n", min=1, help="At most this many recent "
                              "lines (the device keeps about 2,000)."),
    level: str = typer.Option("DEBUG", "--level", help="Lowest level: DEBUG, INFO, WARNING, "
                              "ERROR, CRITICAL."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.5,
                                  help="Seconds to wait for the device's answer."),
    home: Path | None = _home_option(),
    broker: str | None = typer.Option(None, "--broker", envvar="EDGEFLEET_BROKER",
                                      help="MQTT broker HOST:PORT (default: the fleet home's "
                                           "loopback listener, operator account)."),
    username: str | None = typer.Option(None, "--username", help="Broker user "
                                        "[default: operator]."),
    password_file: Path | None = typer.Option(None, "--password-file",
                                              help="File holding that user's password."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Fetch a device's recent log lines over MQTT (redacted on the device).

    Only the fleet's operator account may ask; the device answers in bounded chunks and
    at most about once a second. Example: edgefleet devices logs pi-07 --since 10m -f
    """
    import json
    import sys

    from edgefleet.device.core.errors import UsageError
    from edgefleet.device.wire.logs import LEVELS, MAX_LINES, LogLine
    from edgefleet.server.cli.home_opts import mqtt_for
    from edgefleet.server.fleet.device_logs import LogClient, printable

    level = level.upper()
    if level not in LEVELS:
        raise UsageError(f"--level {level!r}: one of {', '.join(LEVELS)}")
    if lines > MAX_LINES:
        raise UsageError(f"--lines {lines}: at most {MAX_LINES}")
    since_s = parse_since(since) if since else None
    cfg = mqtt_for("operator", home, broker=broker, username=username,
                   password_file=password_file)

    def show(ln: LogLine) -> None:
        if json_out:
            sys.stdout.write(json.dumps(ln.as_dict()) + "\n")
        else:
            stamp = dt.datetime.fromtimestamp(ln.ts).strftime("%Y-%m-%d %H:%M:%S")
            # Not through rich (device text is not markup), and no terminal control codes.
            text = printable(f"{ln.logger}: {ln.msg}")
            sys.stdout.write(f"{stamp} {ln.level:<8} {text}\n")
        sys.stdout.flush()

    with LogClient(cfg, device) as client:
        if follow:
            try:
                for ln in client.follow(lines=lines, since_s=since_s, level=level,
                                        timeout=timeout):
                    show(ln)
            except KeyboardInterrupt:
                return
        else:
            for ln in client.fetch(lines=lines, since_s=since_s, level=level,
                                   timeout=timeout):
                show(ln)
    if client.rejected:
        sys.stderr.write("refused responses: " + ", ".join(
            f"{k}={v}" for k, v in sorted(client.rejected.items())) + "\n")
