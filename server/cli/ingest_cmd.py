"""``edgefleet ingest run``: the telemetry ingest service."""

from __future__ import annotations

import gc
import signal
import threading
from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.fleet_cmd import db_option
from edgefleet.server.cli.home_opts import (
    BROKER_CA_OPTION,
    BROKER_OPTION,
    HOME_OPTION,
    PASSWORD_FILE_OPTION,
)
from edgefleet.server.cli.metrics_cmd import (
    METRICS_HOST_OPTION,
    METRICS_PORT_OPTION,
    start_metrics,
)

__all__ = ["app"]

app = typer.Typer(help="Receive device telemetry over MQTT into the fleet store.",
                  no_args_is_help=True)


@app.command()
def run(
    db: str | None = db_option(),
    home: Path | None = HOME_OPTION,
    broker: str | None = BROKER_OPTION,
    password_file: Path | None = PASSWORD_FILE_OPTION,
    broker_ca: Path | None = BROKER_CA_OPTION,
    config: list[Path] = typer.Option([], "--config", "-c",
                                      help="TOML file(s) with an [ingest] table."),
    host: str | None = typer.Option(None, "--host", hidden=True,
                                    help="Broker host (use --broker)."),
    port: int | None = typer.Option(None, "--port", hidden=True,
                                    help="Broker port (use --broker)."),
    username: str | None = typer.Option(None, "--username", help="Broker user (the ACL's "
                                        "service user)."),
    worker: str | None = typer.Option(
        None, "--worker", metavar="I/K",
        help="Run as worker I of K (0-based): K ingest processes split the fleet by a hash "
             "of the device id, each with its own persistent session that survives broker "
             "restarts. Run all K (any order, any machine); a stopped worker's devices are "
             "queued by the broker until it is back. Default: 0/1, one ingest for all."),
    duration: float = typer.Option(0.0, "--duration", min=0,
                                   help="Stop after this many seconds (0: until SIGTERM)."),
    json_out: bool = typer.Option(False, "--json", help="On exit, print counts as JSON."),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
) -> None:
    """Subscribe to edgefleet/v1/+/+ and store every message exactly once.

    Broker, account and store come from the fleet home (the ingest account, its password
    file, <home>/fleet.db); --broker, --username, --password-file, --db override.

    Example: edgefleet ingest run --home /srv/edgefleet/fleet
    """
    from edgefleet.device.core.config import StrictModel, load_config
    from edgefleet.device.core.metrics import default_metrics
    from edgefleet.server.cli.home_opts import mqtt_for, store_target
    from edgefleet.server.telemetry.ingest import IngestConfig, IngestService
    from edgefleet.server.telemetry.store import open_store

    class _File(StrictModel):
        ingest: IngestConfig = IngestConfig()

    base = mqtt_for("ingest", home, broker=broker, username=username,
                    password_file=password_file, broker_ca=broker_ca)
    mqtt: dict[str, Any] = base.model_dump(exclude_unset=True, exclude_none=True)
    for key, val in (("host", host), ("port", port)):
        if val is not None:
            mqtt[key] = val
    over: dict[str, Any] = {"ingest": {"mqtt": mqtt}}
    if worker is not None:
        over["ingest"]["worker"], over["ingest"]["workers"] = _parse_worker(worker)
    cfg = load_config(_File, config, over).ingest
    store = open_store(store_target(db, home, must_exist=False))
    svc = IngestService(store, cfg)
    endpoint = start_metrics(metrics_port, metrics_host, svc.metrics, quiet=json_out)

    def _stop(*_: object) -> None:
        svc.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if duration:
        threading.Timer(duration, svc.stop).start()
    if not json_out:
        console.print(f"ingesting from {cfg.mqtt.host}:{cfg.mqtt.port} into "
                      f"{store.target} (worker {cfg.worker} of {cfg.workers}, session "
                      f"{cfg.session_id}); Ctrl-C to stop")
    # Everything imported and set up so far lives as long as the process: out of the
    # collector's sight, a full collection no longer walks pydantic's, paho's and the
    # database driver's objects again and again while messages stream through.
    gc.freeze()
    svc.run()
    counts = {"stored": svc.stored, "duplicates": svc.duplicates, "rejected": svc.rejected,
              "skipped": svc.skipped, "worker": cfg.worker, "workers": cfg.workers,
              "rejects": store.rejects(),
              "counters": {k: v for k, v in default_metrics().snapshot()["counters"].items()
                           if k.startswith("ingest_")}}
    store.close()
    if endpoint is not None:
        endpoint.close()
    if json_out:
        print_json(counts)
    else:
        console.print(f"stopped: {svc.stored} stored, {svc.duplicates} duplicates dropped")


def _parse_worker(value: str) -> tuple[int, int]:
    """``I/K`` → ``(I, K)``; the config's validator checks the range."""
    from edgefleet.device.core.errors import UsageError

    i, sep, k = value.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(i), int(k)
    except ValueError:
        raise UsageError(f"--worker must be I/K, e.g. 0/4, not {value!r}") from None


@app.command()
def forget(
    worker: str = typer.Option(..., "--worker", metavar="I/K",
                               help="The retired worker whose session to delete."),
    home: Path | None = HOME_OPTION,
    broker: str | None = BROKER_OPTION,
    password_file: Path | None = PASSWORD_FILE_OPTION,
    broker_ca: Path | None = BROKER_CA_OPTION,
    config: list[Path] = typer.Option([], "--config", "-c",
                                      help="TOML file(s) with an [ingest] table "
                                           "(its client_id)."),
    username: str | None = typer.Option(None, "--username", help="Broker user."),
) -> None:
    """Delete a retired ingest worker's session at the broker, and the queue it holds.

    After changing the number of workers (docs/operations.md), the old K's sessions keep
    queueing every message until their expiry (7 days, up to the broker's queue bound).
    Run this for each old worker once the new ones store everything: it connects with a
    clean start under that worker's client id, which discards the session.

    Example: edgefleet ingest forget --home /srv/edgefleet/fleet --worker 1/2
    """
    import time

    from edgefleet.device.core.config import StrictModel, load_config
    from edgefleet.device.core.errors import EdgefleetError
    from edgefleet.device.core.metrics import Metrics
    from edgefleet.device.core.mqtt_link import MqttLink
    from edgefleet.server.cli.home_opts import mqtt_for
    from edgefleet.server.telemetry.ingest import IngestConfig

    class _File(StrictModel):
        ingest: IngestConfig = IngestConfig()

    base = mqtt_for("ingest", home, broker=broker, username=username,
                    password_file=password_file, broker_ca=broker_ca)
    i, k = _parse_worker(worker)
    over = {"ingest": {"mqtt": base.model_dump(exclude_unset=True, exclude_none=True),
                       "worker": i, "workers": k}}
    cfg = load_config(_File, config, over).ingest
    link = MqttLink(cfg.mqtt, cfg.session_id, prefix="ingest_forget", metrics=Metrics(),
                    clean_start=True, session_expiry=0)
    end = time.monotonic() + cfg.mqtt.connect_timeout
    while not link.connected and time.monotonic() < end:
        link.safe_step(0.05)
    ok = link.connected
    link.close()
    if not ok:
        raise EdgefleetError(f"could not connect to {cfg.mqtt.host}:{cfg.mqtt.port} as "
                             f"{cfg.session_id}")
    console.print(f"session {cfg.session_id} deleted at {cfg.mqtt.host}:{cfg.mqtt.port}")
