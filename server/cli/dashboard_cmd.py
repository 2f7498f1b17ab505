"""``edgefleet dashboard serve`` and ``edgefleet dashboard user add|ls|rm``: the live web UI.

The dashboard reads the same stores the other commands read, resolved by the same
options (``--home``, ``--db``, ``--registry``, ``--broker``); its actions call what
``alerts --ack``, ``approvals approve|deny``, ``promote`` and ``rollback`` call.
See docs/operations.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.fleet_cmd import db_option
from edgefleet.server.cli.home_opts import HOME_OPTION
from edgefleet.server.cli.metrics_cmd import METRICS_HOST_OPTION, METRICS_PORT_OPTION, start_metrics
from edgefleet.server.cli.registry_cmd import HOME as REGISTRY_OPTION
from edgefleet.server.cli.rollout_cmd import BROKER

if TYPE_CHECKING:
    from edgefleet.server.dashboard.proxies import TrustedProxies
    from edgefleet.server.fleet.home import FleetHome

__all__ = ["app", "trusted_proxies"]

app = typer.Typer(help="The live web dashboard (docs/operations.md).", no_args_is_help=True)
user_app = typer.Typer(help="Who may sign in to the dashboard.", no_args_is_help=True)
app.add_typer(user_app, name="user")

STATE_OPTION = typer.Option(None, "--state", help="Dashboard users, session secret and plot "
                                                  "cache (default: <fleet home>/dashboard).")


def _state(state: Path | None, home: Path | None) -> Path:
    if state is not None:
        return state
    from edgefleet.server.cli.home_opts import fleet_home
    from edgefleet.server.fleet.home import default_root

    fh = fleet_home(home)
    return (fh.root if fh is not None else default_root()) / "dashboard"


def trusted_proxies(flags: list[str] | None, fh: FleetHome | None) -> TrustedProxies:
    """``--trusted-proxy`` (every one given), else the home's ``[server]
    dashboard_trusted_proxies``, else none."""
    from edgefleet.server.dashboard.proxies import TrustedProxies

    if flags:
        return TrustedProxies(flags)
    return TrustedProxies(fh.settings.server.dashboard_trusted_proxies if fh else ())


def _read_password(password_file: Path | None) -> str:
    if password_file is not None:
        text = sys.stdin.read() if str(password_file) == "-" else password_file.read_text()
        return text.rstrip("\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("add")
def user_add(name: str = typer.Argument(..., help="User name."),
             password_file: Path | None = typer.Option(
                 None, "--password-file", help="File holding the password ('-': stdin); "
                                               "default: ask twice."),
             replace: bool = typer.Option(False, "--replace", help="Set a new password."),
             state: Path | None = STATE_OPTION, home: Path | None = HOME_OPTION) -> None:
    """Add a dashboard user; the password is stored as a salted PBKDF2 hash (0600 file).

    Example: edgefleet dashboard user add alice
    """
    from edgefleet.server.dashboard.auth import Users

    Users(_state(state, home)).add(name, _read_password(password_file), replace=replace)
    console.print(f"[green]added[/] dashboard user {name}")


@user_app.command("ls")
def user_ls(state: Path | None = STATE_OPTION, home: Path | None = HOME_OPTION,
            json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """List the dashboard users."""
    from edgefleet.server.dashboard.auth import Users

    names = Users(_state(state, home)).names()
    if json_out:
        print_json({"users": names})
        return
    console.print("\n".join(names) or "no dashboard users (edgefleet dashboard user add NAME)")


@user_app.command("rm")
def user_rm(name: str = typer.Argument(..., help="User name."),
            state: Path | None = STATE_OPTION, home: Path | None = HOME_OPTION) -> None:
    """Remove a dashboard user (their sessions stop working at once)."""
    from edgefleet.server.dashboard.auth import Users

    if not Users(_state(state, home)).remove(name):
        raise UsageError(f"no dashboard user {name!r}")
    console.print(f"removed dashboard user {name}")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by "
                                                          "default; put a TLS proxy in front "
                                                          "or pass --tls-cert to expose it)."),
    port: int = typer.Option(8600, "--port", min=1, max=65535, help="TCP port."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Serve HTTPS with this "
                                                                  "certificate (PEM)."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Its private key (PEM)."),
    db: str | None = db_option(),
    registry: Path | None = REGISTRY_OPTION,
    fl_db: Path | None = typer.Option(None, "--fl-db", help="FL store (default: <fleet "
                                                           "home>/fl/fl.db)."),
    broker: str | None = BROKER,
    epsilon_budget: float = typer.Option(10.0, "--epsilon-budget", min=0.0,
                                         help="ε budget shown beside a device's ε when its "
                                              "report does not carry one."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, max=60.0,
                                   help="Seconds between live updates."),
    logs_timeout: float = typer.Option(5.0, "--logs-timeout", min=0.5, max=30.0,
                                       help="Seconds a device page waits for the device's "
                                            "logs."),
    trusted_proxy: list[str] | None = typer.Option(
        None, "--trusted-proxy", help="A reverse proxy (address or network; repeat for "
                                      "more) whose X-Forwarded-For names the client "
                                      "(default: the home's [server] "
                                      "dashboard_trusted_proxies; else none)."),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
    state: Path | None = STATE_OPTION,
    home: Path | None = HOME_OPTION,
) -> None:
    """Serve the live dashboard until Ctrl-C / SIGTERM.

    Examples:

      edgefleet dashboard user add alice

      edgefleet dashboard serve                       (http://127.0.0.1:8600)

      edgefleet dashboard serve --host 0.0.0.0 --tls-cert dash.pem --tls-key dash.key

      edgefleet dashboard serve --trusted-proxy 127.0.0.1   (behind nginx on this host)
    """
    import uvicorn

    from edgefleet.device.core.metrics import Metrics
    from edgefleet.server.cli.home_opts import fleet_home, mqtt_for, registry_path, store_target
    from edgefleet.server.cli.registry_cmd import open_registry
    from edgefleet.server.cli.rollout_cmd import _controller
    from edgefleet.server.dashboard.app import DashboardConfig, create_app
    from edgefleet.server.dashboard.auth import Users, load_secret
    from edgefleet.server.dashboard.views import Sources
    from edgefleet.server.fleet.device_logs import LogClient
    from edgefleet.server.telemetry.store import open_store

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    st = _state(state, home)
    if not Users(st).names():
        raise UsageError(f"no dashboard users in {st} (run `edgefleet dashboard user add "
                         "NAME` first)")
    fh = fleet_home(home)
    proxies = trusted_proxies(trusted_proxy, fh)
    reg = registry_path(registry, home)
    has_registry = (reg / "registry.db").is_file()
    groups = {d.name: d.group for d in fh.devices.active()} if fh is not None else {}
    metrics = Metrics()
    # Device logs: `devices logs`' client on the operator account (home, or --broker and
    # $EDGEFLEET_MQTT_USERNAME / _PASSWORD); without either there is no account to ask with.
    operator = mqtt_for("operator", home, broker=broker) if fh is not None or broker else None
    src = Sources(
        store=open_store(store_target(db, home)), registry=reg,
        open_registry=(lambda: open_registry(reg)) if has_registry else None,
        controller=(lambda: _controller(reg, broker, home)) if has_registry else None,
        fl_db=fl_db or (fh.fl_dir / "fl.db" if fh is not None else None),
        groups=groups, epsilon_budget=epsilon_budget,
        logs=(lambda dev: LogClient(operator, dev, metrics=metrics)) if operator else None)
    cfg = DashboardConfig(sources=src, state=st, secret=load_secret(st),
                          tls=tls_cert is not None, interval=interval,
                          logs_timeout=logs_timeout, trusted_proxies=proxies)
    endpoint = start_metrics(metrics_port, metrics_host, metrics)
    scheme = "https" if tls_cert else "http"
    console.print(f"dashboard on {scheme}://{host}:{port}/ (Ctrl-C to stop)")
    try:
        # proxy_headers=False: uvicorn would otherwise believe X-Forwarded-For from
        # 127.0.0.1 (or $FORWARDED_ALLOW_IPS) before the app sees the peer; the app's
        # trusted proxies are the one place that decides.
        uvicorn.run(create_app(cfg, metrics), host=host, port=port, log_level="warning",
                    proxy_headers=False,
                    ssl_certfile=str(tls_cert) if tls_cert else None,
                    ssl_keyfile=str(tls_key) if tls_key else None,
                    timeout_graceful_shutdown=2)
    finally:
        if endpoint is not None:
            endpoint.close()
        src.store.close()
