"""``edgefleet ingest run``: the telemetry ingest service."""

from __future__ import annotations

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
    svc.run()
    counts = {"stored": svc.stored, "duplicates": svc.duplicates, "rejected": svc.rejected,
              "skipped": svc.skipped, "worker": cfg.worker, "workers": cfg.workers,
              "rejects": store.rejects(),
              "counters": {k: v for k, v in default_metrics().snapshot()["counters"].items()
                           if k.startswith("ingest_")}}
    store.close()
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
