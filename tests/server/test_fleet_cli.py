"""The operator CLI on a store filled by a real `edgefleet ingest run` process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.metrics import CONFIDENCE_BUCKETS, Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.reporter import TelemetryReporter
from edgefleet.device.telemetry.spool import Spool
from edgefleet.models.core.reference_stats import reference_stats
from edgefleet.server.telemetry.store import open_store
from tests.conftest import BIN, run_cli
from tests.support.telemetry import wait_until


def _device(name: str, port: int, tmp: Path, *, drifted: bool) -> None:
    rng = np.random.default_rng(0)
    m = Metrics()
    ref = reference_stats(rng.normal(size=(1000, 4)), rng.beta(8, 1, size=1000))
    drift = DriftMonitor(ref, window=200)
    pub = TelemetryPublisher(name, MqttConfig(port=port), Spool(tmp / f"{name}.db"),
                             metrics=m).start()
    rep = TelemetryReporter(pub, metrics=m, drift=drift)
    m.set("model_name", "digits-mlp")
    m.set("model_version", "1.2.0")
    m.set("training_epsilon", 2.5)
    for step in range(3):
        for _ in range(100):
            m.inc("inferences")
            fell_back = drifted and rng.random() < 0.6
            m.inc("fallback_cloud" if fell_back else "fallback_local")
            m.observe("inference_latency_ms", float(rng.uniform(0.2, 3.0)))
            c = float(rng.beta(2, 2) if drifted else rng.beta(8, 1))
            m.observe("inference_confidence", c, CONFIDENCE_BUCKETS)
            x = rng.normal(size=4) + (3.0 if drifted else 0.0)
            drift.observe(x, c)
        rep.report()
        if step == 1:
            rep.event("model_swapped", version="1.2.0")
    assert pub.drain(10)
    pub.stop()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_ingest_run_and_fleet_commands(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "fleet.db"
    ingest = subprocess.Popen(
        [str(BIN / "edgefleet"), "ingest", "run", "--db", str(db), "--port",
         str(mosquitto.port), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ})
    try:
        assert wait_until(db.exists, 20)
        time.sleep(1.5)  # connected and subscribed
        _device("pi-01", mosquitto.port, tmp_path, drifted=False)
        _device("pi-02", mosquitto.port, tmp_path, drifted=True)
        store = open_store(db)
        assert wait_until(lambda: store.message_stats()["rows"] == 8, 20)
        assert wait_until(lambda: all(not d["online"] for d in store.devices()), 10)
    finally:
        ingest.send_signal(signal.SIGTERM)
        out, err = ingest.communicate(timeout=20)
    assert ingest.returncode == 0, err
    summary = json.loads(out)
    assert summary["stored"] == 8 and summary["duplicates"] == 0

    env = {"EDGEFLEET_DB": str(db)}
    ls = run_cli("fleet", "ls", "--json", env=env)
    assert ls.returncode == 0, ls.stderr
    rows = {r["device"]: r for r in json.loads(ls.stdout)["devices"]}
    assert set(rows) == {"pi-01", "pi-02"}
    assert rows["pi-01"]["inferences"] == 300 and rows["pi-01"]["fallback_rate"] == 0
    assert rows["pi-02"]["fallback_rate"] > 0.4
    assert rows["pi-02"]["drift"] > 0.25 > rows["pi-01"]["drift"]
    assert rows["pi-01"]["model_version"] == "1.2.0" and rows["pi-01"]["epsilon"] == 2.5
    assert rows["pi-01"]["online"] is False  # said offline on a clean stop

    table = run_cli("fleet", "ls", env=env)
    assert table.returncode == 0 and "pi-02" in table.stdout

    show = run_cli("fleet", "show", "pi-02", "--json", env=env)
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["device"]["last_metrics"]["system"]["process_uptime_s"] is not None
    assert any(e["kind"] == "device.model_swapped" for e in shown["events"])

    tail = run_cli("telemetry", "tail", "--device", "pi-01", "--json", "-n", "3", env=env)
    msgs = json.loads(tail.stdout)["messages"]
    assert [m["seq"] for m in msgs] == [2, 3, 4] and {m["device"] for m in msgs} == {"pi-01"}
    assert run_cli("telemetry", "tail", env=env).returncode == 0

    al = json.loads(run_cli("alerts", "--json", env=env).stdout)
    open_kinds = {(a["device"], a["kind"]) for a in al["open"]}
    assert ("pi-02", "drift") in open_kinds and ("pi-02", "fallback_rate") in open_kinds
    assert not any(d == "pi-01" for d, _ in open_kinds)

    rep = run_cli("report", "--out", str(tmp_path / "report"), "--json", env=env)
    assert rep.returncode == 0, rep.stderr
    files = json.loads(rep.stdout)["files"]
    want = {"index.html", "latency.png", "confidence.png", "fallback.png", "drift.png"}
    assert want <= set(files)
    assert (tmp_path / "report" / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "pi-02" in (tmp_path / "report" / "index.html").read_text()

    bad = run_cli("fleet", "show", "nope", env=env)
    assert bad.returncode == 64 and "unknown device" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run_cli("fleet", "ls", "--db", str(tmp_path / "absent.db"))
    assert missing.returncode == 64 and "no fleet store" in missing.stderr
