"""``edgefleet metrics serve`` (fleet gauges from the store) and the ``--metrics-port``
option every service shares."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.device.core.cli_support import console
from edgefleet.server.cli.fleet_cmd import db_option
from edgefleet.server.cli.home_opts import HOME_OPTION

if TYPE_CHECKING:
    from edgefleet.device.core.metrics import Metrics
    from edgefleet.server.metrics.exporter import MetricsEndpoint

__all__ = ["METRICS_HOST_OPTION", "METRICS_PORT_OPTION", "app", "start_metrics"]

app = typer.Typer(help="Prometheus metrics: the fleet's per-device gauges from the store.",
                  no_args_is_help=True)

METRICS_PORT_OPTION: Any = typer.Option(
    None, "--metrics-port", min=0, max=65535, envvar="EDGEFLEET_METRICS_PORT",
    help="Serve Prometheus /metrics on this port (plain HTTP; default: off; 0: any free "
         "port).")
METRICS_HOST_OPTION: Any = typer.Option(
    "127.0.0.1", "--metrics-host", help="Address of the /metrics listener (loopback by "
                                        "default: it has no login).")


def start_metrics(port: int | None, host: str, metrics: Metrics, *extra: Any,
                  quiet: bool = False) -> MetricsEndpoint | None:
    """Serve ``metrics`` (and ``extra`` collectors) when ``port`` is set; the endpoint."""
    if port is None:
        return None
    from edgefleet.device.core.errors import ConfigError
    from edgefleet.server.metrics.exporter import MetricsCollector, serve_metrics

    try:
        ep = serve_metrics(port, [MetricsCollector(metrics), *extra], host=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    if not quiet:
        console.print(f"metrics at {ep.url}")
    return ep


@app.command()
def serve(
    db: str | None = db_option(),
    home: Path | None = HOME_OPTION,
    port: int = typer.Option(9478, "--port", min=0, max=65535,
                             help="TCP port of /metrics (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    epsilon_budget: float | None = typer.Option(
        None, "--epsilon-budget", min=0.0,
        help="The fleet's privacy budget ε (exported for 'ε spent of budget'; default: the "
             "retraining policy's)."),
    max_devices: int = typer.Option(20_000, "--max-devices", min=0,
                                    help="Devices that get per-device series (cardinality "
                                         "bound); the rest are counted only."),
    duration: float = typer.Option(0.0, "--duration", min=0,
                                   help="Stop after this many seconds (0: until SIGTERM)."),
) -> None:
    """Serve fleet-level gauges read from the fleet store at each scrape: devices by
    status, and per device last-seen age, inferences, local/cloud/degraded shares, drift
    PSI, ε spent, open alerts.

    Example: edgefleet metrics serve --home /srv/edgefleet/fleet --port 9478
    """
    import signal
    import threading

    from edgefleet.device.core.metrics import Metrics
    from edgefleet.server.cli.home_opts import store_target
    from edgefleet.server.metrics.fleet import FleetCollector
    from edgefleet.server.retrain.policy import RetrainPolicy
    from edgefleet.server.telemetry.store import open_store

    store = open_store(store_target(db, home, must_exist=False))
    if epsilon_budget is None:
        epsilon_budget = RetrainPolicy().epsilon_budget
    own = Metrics()
    fleet = FleetCollector(store, epsilon_budget=epsilon_budget, max_devices=max_devices,
                           metrics=own)
    ep = start_metrics(port, host, own, fleet, quiet=True)
    assert ep is not None
    console.print(f"fleet metrics of {store.target} at {ep.url}; Ctrl-C to stop")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait(duration or None)
    ep.close()
    store.close()
