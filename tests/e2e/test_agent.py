"""The agent as one real process: pty sensor → predictor → local API and MQTT telemetry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.device.agent.local_api import request
from edgefleet.models.core.tasks import get_task
from edgefleet.server.fleet.broker import MosquittoBroker
from tests.conftest import BIN, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _write_config(path: Path, state: Path, broker: MosquittoBroker, package: Path,
                  serial: Path | None, **extra: str) -> Path:
    lines = [
        'device_id = "dev-1"',
        f'state_dir = "{state}"',
        "[mqtt]", f'host = "{broker.host}"', f"port = {broker.port}",
        "[model]", f'package = "{package}"', "threads = 1",
        "[telemetry]", "interval_s = 0.3",
        "[fallback]", 'mode = "features"', "deadline_ms = 50",
    ]
    if serial:
        lines += ["[input]", f'serial = "{serial}"']
    path.write_text("\n".join(lines) + "\n" + "\n".join(extra.values()))
    return path


class _Collector:
    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.subscribe(topic, qos=1)
        self.c.loop_start()
        self.lock = threading.Lock()

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def metrics(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m["body"] for t, m in self.messages if t.endswith("/metrics")]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _wait(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(180)
def test_agent_serves_reports_and_stops_cleanly(
        tmp_path: Path, mosquitto: MosquittoBroker, digits_package: Path) -> None:
    sensor = tmp_path / "sensor"
    sim = subprocess.Popen([str(BIN / "edgefleet-sensor-sim"), "--task", "digits",
                            "--create-pty", str(sensor), "--rate", "100", "--seed", "3"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    collector = _Collector(mosquitto.port, "edgefleet/v1/dev-1/#")
    state = tmp_path / "state"
    cfg = _write_config(tmp_path / "agent.toml", state, mosquitto, digits_package, sensor)
    agent = None
    try:
        _wait(sensor.exists, 30, "the simulator's pty")
        agent = subprocess.Popen([str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        sock = state / "agent.sock"
        _wait(sock.exists, 60, "the local API socket")
        x = get_task("digits").split().x_test[:2].tolist()
        reply = request(sock, {"id": 7, "input": x})
        assert reply["id"] == 7 and len(reply.get("predictions", [])) == 2, reply
        assert all(p["source"] in ("local", "degraded") for p in reply["predictions"])
        bad = request(sock, {"id": 8, "input": [float("nan")] * 64})
        # a NaN literal never reaches the model: the guarded JSON reader refuses it
        assert bad["error"]["code"] == "bad_json" and "non_finite" in bad["error"]["message"]
        # Frames from the pty are answered and reported.
        _wait(lambda: any(b["inferences"] > 50 for b in collector.metrics()), 60,
              "telemetry with inferences from the serial input")
        last = collector.metrics()[-1]
        assert last["counters"].get("serial_frames_ok", 0) > 0
        assert last["model"]["name"] == "digits-mlp"
        # A report taken mid-inference may count one inference not yet answered.
        assert 0 <= last["inferences"] - (last["local"] + last["degraded"]) <= 1
        # SIGTERM: exit 0 within a few seconds, the last report flushed.
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        assert time.monotonic() - t0 < 10
        assert not sock.exists()
        # The final report is taken after input stopped: every inference was answered.
        time.sleep(1.0)  # the broker has it (drained with PUBACKs); let the collector see it
        final = collector.metrics()[-1]
        assert final["local"] + final["degraded"] == final["inferences"] > 50
    finally:
        if agent and agent.poll() is None:
            agent.kill()
        sim.send_signal(signal.SIGINT)
        sim.wait(10)
        collector.close()


@pytest.mark.timeout(120)
def test_doctor(tmp_path: Path, mosquitto: MosquittoBroker, digits_package: Path) -> None:
    cfg = _write_config(tmp_path / "a.toml", tmp_path / "s", mosquitto, digits_package, None)
    ok = run_cli("doctor", "--config", str(cfg), "--json", program="edgefleet-agent")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    bad = _write_config(tmp_path / "b.toml", tmp_path / "s", mosquitto, digits_package,
                        tmp_path / "no-such-tty")
    mosquitto.stop()
    res = run_cli("doctor", "--config", str(bad), "--json", program="edgefleet-agent")
    assert res.returncode == 1
    failed = {c["name"] for c in json.loads(res.stdout)["checks"] if not c["ok"]}
    assert failed == {"broker", "serial"}
    typo = tmp_path / "c.toml"
    typo.write_text(cfg.read_text().replace("threads = 1", "thraeds = 1"))
    res = run_cli("doctor", "--config", str(typo), program="edgefleet-agent")
    assert res.returncode == 78 and "model.thraeds: unknown key" in res.stderr
    assert os.path.exists(tmp_path / "c.toml")


@pytest.mark.timeout(120)
def test_agent_serves_when_its_spool_cannot_open(
        tmp_path: Path, mosquitto: MosquittoBroker, digits_package: Path) -> None:
    """A spool that cannot be opened (here a directory in its place; on a device, a full or
    failing disk) is reported and buffered in memory; inference and telemetry go on."""
    state = tmp_path / "state"
    (state / "telemetry-spool.db").mkdir(parents=True)
    collector = _Collector(mosquitto.port, "edgefleet/v1/dev-1/#")
    cfg = _write_config(tmp_path / "agent.toml", state, mosquitto, digits_package, None)
    agent = subprocess.Popen([str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sock = state / "agent.sock"
        _wait(sock.exists, 60, "the local API socket")
        x = get_task("digits").split().x_test[:3].tolist()
        assert len(request(sock, {"id": 1, "input": x})["predictions"]) == 3
        _wait(lambda: any(b["counters"].get("telemetry_spool_unavailable") == 1
                          and b["inferences"] >= 3 for b in collector.metrics()), 30,
              "telemetry that reports the unavailable spool")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        assert (state / "telemetry-spool.db").is_dir()  # left as it was
    finally:
        if agent.poll() is None:
            agent.kill()
        collector.close()
