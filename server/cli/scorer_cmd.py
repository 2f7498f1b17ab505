"""``edgefleet scorer``: run the cloud scorer that answers devices' unsure samples."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.home_opts import (
    BROKER_CA_OPTION,
    BROKER_OPTION,
    HOME_OPTION,
    PASSWORD_FILE_OPTION,
    USERNAME_OPTION,
)
from edgefleet.server.cli.metrics_cmd import (
    METRICS_HOST_OPTION,
    METRICS_PORT_OPTION,
    start_metrics,
)

__all__ = ["app"]

app = typer.Typer(
    help="The cloud scorer: answers the samples devices are unsure about (MQTT 5 "
         "request/response, shared subscription, micro-batching).",
    no_args_is_help=True,
)


@app.command()
def run(
    package: Path = typer.Option(..., "--package", "-p", help="Cloud model package folder."),
    home: Path | None = HOME_OPTION,
    broker: str | None = BROKER_OPTION,
    scorer_id: str = typer.Option("scorer", "--id", help="This process's name (in replies "
                                  "and its status topic)."),
    group: str = typer.Option("scorers", "--group", help="Shared-subscription group: "
                              "scorers in one group split the requests."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Largest micro-batch."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0.0,
                                      help="Longest a request waits for its batch to fill."),
    threads: int = typer.Option(2, "--threads", min=1, help="onnxruntime threads."),
    username: str | None = USERNAME_OPTION,
    password_file: Path | None = PASSWORD_FILE_OPTION,
    broker_ca: Path | None = BROKER_CA_OPTION,
    password_env: str = typer.Option("", "--password-env", hidden=True,
                                     help="Name of the environment variable holding the "
                                          "MQTT password (use --password-file)."),
    duration: float = typer.Option(0.0, "--duration", min=0.0,
                                   help="Stop after this many seconds (0: until SIGTERM)."),
    json_out: bool = typer.Option(False, "--json", help="On exit, print the counters as JSON."),
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
) -> None:
    """Serve a cloud model package to devices through the broker until stopped.

    Broker and account come from the fleet home (the scorer account and its password
    file); --broker, --username, --password-file override. Two processes with the same
    --group split the load:

        edgefleet scorer run --package out/digits-cloud --id s1
        edgefleet scorer run --package out/digits-cloud --id s2

    Each process publishes a retained status (online/offline) on
    edgefleet/v1/scorer/<id>/status; see docs/fallback.md for topics and payloads.
    """
    import os
    import signal
    import threading

    from edgefleet.device.core.metrics import Metrics
    from edgefleet.device.runtime.predictor import Predictor
    from edgefleet.server.cli.home_opts import mqtt_for
    from edgefleet.server.scorer import Scorer, ScorerConfig

    mqtt = mqtt_for("scorer", home, broker=broker, username=username,
                    password_file=password_file, broker_ca=broker_ca)
    if password_env and os.environ.get(password_env):
        mqtt = mqtt.model_copy(update={"password": os.environ[password_env],
                                       "password_file": None})
    host, port = mqtt.host, mqtt.port
    cfg = ScorerConfig(scorer_id=scorer_id, group=group, max_batch=max_batch,
                       max_wait_ms=max_wait_ms)
    metrics = Metrics()
    predictor = Predictor.load(package, threads=threads, metrics=metrics)
    scorer = Scorer(predictor, mqtt, cfg, metrics)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if duration:
        threading.Timer(duration, stop.set).start()
    if not json_out:
        console.print(f"scorer {scorer_id}: {scorer.model} on {host}:{port} (group {group})")
    endpoint = start_metrics(metrics_port, metrics_host, metrics, quiet=json_out)
    scorer.run(stop)
    if endpoint is not None:
        endpoint.close()
    counters = metrics.snapshot()["counters"]
    if json_out:
        print_json({"scorer": scorer_id, "model": scorer.model, "counters": counters})
    else:
        console.print(f"scorer {scorer_id} stopped: {counters.get('scorer_replies_ok', 0)} "
                      "answers")
