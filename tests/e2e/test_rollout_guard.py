"""``edgefleet rollout guard`` stops an unhealthy canary after the operator's CLI has exited.

Real parts: mosquitto, ``edgefleet ingest run`` writing the fleet store, the ``edgefleet``
CLI and guard processes. Two devices report telemetry (counters that only grow within a
boot) and a retained update state without health figures, so the guard judges them from
the store: rates since the rollout began, from the persisted baseline. The first guard is
restarted before the device turns bad; a guard that measured from its own start would
see a healthy device. Two guards run at once (one stop, one audit entry), the broker
restarts under them, and the healthy canary stays running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.device.wire.telemetry import topic_for
from edgefleet.device.wire.updates import device_topic, state_topic
from edgefleet.server.telemetry.store import open_store
from tests.conftest import BIN, run_cli
from tests.server.test_rollout_cli import _retained
from tests.support.updates import make_registry, package_version, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]


class FakeDevice:
    """Publishes what an agent would: telemetry envelopes and a retained update state."""

    def __init__(self, client: mqtt.Client, name: str, boot: str) -> None:
        self.client, self.name, self.boot, self.seq = client, name, boot, 0

    def state(self, version: str) -> None:
        body = {"device": self.name, "model": "digits-mlp", "version": version}
        self.client.publish(state_topic(self.name), json.dumps(body), qos=1,
                            retain=True).wait_for_publish(10)

    def report(self, db: Path, version: str, inferences: int, fallback: int) -> None:
        """One metrics report, re-sent (same seq) until the store has it."""
        self.seq += 1
        env = {"v": 1, "device": self.name, "boot": self.boot, "seq": self.seq,
               "ts": time.time(), "kind": "metrics",
               "body": {"inferences": inferences, "fallback": fallback, "degraded": 0,
                        "local": inferences - fallback,
                        "model": {"name": "digits-mlp", "version": version}}}
        store = open_store(db)
        try:
            for _ in range(30):
                self.client.publish(topic_for(self.name, "metrics"), json.dumps(env),
                                    qos=1).wait_for_publish(10)
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    row = store.device(self.name)
                    if row and row["n_inferences"] == inferences:
                        return
                    time.sleep(0.05)
        finally:
            store.close()
        raise AssertionError(f"{self.name}'s report never reached the store")


def _guard(tmp: Path, name: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    out = (tmp / f"{name}.out").open("wb")
    return subprocess.Popen([str(BIN / "edgefleet"), "rollout", "guard", "--json", *args],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})


def _passes(tmp: Path, name: str) -> list[dict[str, Any]]:
    lines = (tmp / f"{name}.out").read_text().splitlines()
    return [json.loads(x) for x in lines if x.startswith("{")]


def _status(registry: Path, rid: str) -> str:
    with sqlite3.connect(registry / "rollouts.db") as db:
        return str(db.execute("SELECT status FROM rollouts WHERE id = ?", (rid,)).fetchone()[0])


def _baseline(registry: Path, rid: str, device: str) -> tuple[Any, ...] | None:
    with sqlite3.connect(registry / "rollouts.db") as db:
        row = db.execute("SELECT inferences, fallback FROM rollout_devices WHERE rollout = ? "
                         "AND device = ? AND recorded IS NOT NULL", (rid, device)).fetchone()
    return tuple(row) if row else None


def _stop(p: subprocess.Popen[bytes]) -> int:
    p.send_signal(signal.SIGTERM)
    return p.wait(30)


@contextlib.contextmanager
def guard_bench(tmp_path: Path, digits_package: Path, mosquitto: Any) -> Iterator[
        tuple[Path, Any, Path, dict[str, str], subprocess.Popen[bytes], mqtt.Client,
              list[subprocess.Popen[bytes]]]]:
    """A registry with 1.0.0-1.2.0, a real ingest into a fleet store, an MQTT client for
    fake devices, and the guard processes a test starts (all stopped on exit)."""
    registry = tmp_path / "registry"
    reg = make_registry(registry)
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    reg.close()
    db = tmp_path / "fleet.db"
    env = {"EDGEFLEET_REGISTRY": str(registry), "EDGEFLEET_DB": str(db),
           "EDGEFLEET_BROKER": f"127.0.0.1:{mosquitto.port}", "EDGEFLEET_LOG": "INFO"}
    ingest = subprocess.Popen([str(BIN / "edgefleet"), "ingest", "run", "--db", str(db),
                               "--port", str(mosquitto.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()
    guards: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(db.exists, what="the ingest's store")
        yield registry, reg, db, env, ingest, client, guards
    finally:
        for g in guards:
            if g.poll() is None:
                g.kill()
                g.wait()
        client.loop_stop()
        client.disconnect()
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(30)


def test_guard_stops_a_canary_after_the_cli_exited(tmp_path: Path, digits_package: Path,
                                                   mosquitto: Any) -> None:
    with guard_bench(tmp_path, digits_package, mosquitto) as (registry, reg, db, env, ingest,
                                                               client, guards):
        bad, good = FakeDevice(client, "pi-bad", "b0b0b0b0"), FakeDevice(client, "pi-good",
                                                                         "c0c0c0c0")
        for dev in (bad, good):
            dev.state("1.0.0")
            dev.report(db, "1.0.0", 1000, 10)  # before the rollout: the baseline

        # Two canaries started from the CLI, which then exits.
        res = run_cli("rollout", "digits-mlp@1.2.0", "--devices", "pi-bad", "--json", env=env)
        assert res.returncode == 0, res.stderr
        rid_bad = json.loads(res.stdout)["id"]
        res = run_cli("rollout", "digits-mlp@1.1.0", "--devices", "pi-good", "--json", env=env)
        assert res.returncode == 0, res.stderr
        rid_good = json.loads(res.stdout)["id"]
        bad.state("1.2.0")
        good.state("1.1.0")
        # Too few inferences to judge yet: 15, all fallbacks.
        bad.report(db, "1.2.0", 1015, 25)

        g1 = _guard(tmp_path, "g1", env, "--interval", "0.3", "--min-inferences", "20")
        guards.append(g1)
        wait_for(lambda: _baseline(registry, rid_bad, "pi-bad") is not None, what="baseline")
        # Measured from the last report before the rollout, not from the guard's start.
        assert _baseline(registry, rid_bad, "pi-bad") == (1000, 10)
        wait_for(lambda: len(_passes(tmp_path, "g1")) >= 2, what="two passes of g1")
        assert _stop(g1) == 0
        assert _status(registry, rid_bad) == "running"
        first = _passes(tmp_path, "g1")[-1]["checked"]
        assert {c["id"]: c["devices"]["pi-bad"]["inferences"] for c in first
                if c["id"] == rid_bad} == {rid_bad: 15}

        # Restarted, and a second guard beside it; the broker restarts under both.
        g2 = _guard(tmp_path, "g2", env, "--interval", "0.3")
        g3 = _guard(tmp_path, "g3", env, "--interval", "0.3")
        guards += [g2, g3]
        wait_for(lambda: _passes(tmp_path, "g2") and _passes(tmp_path, "g3"),
                 what="a pass of each guard")
        mosquitto.restart()
        wait_for(lambda: ingest.poll() is None and client.is_connected(), what="reconnects")
        bad.state("1.2.0")
        good.state("1.1.0")
        # Since the rollout began: 40 inferences, 17 fallbacks (0.42); since the restart
        # of the guard it would have been 25 and 2 (0.08): healthy.
        bad.report(db, "1.2.0", 1040, 27)
        good.report(db, "1.1.0", 1100, 12)  # 100 inferences, 2 fallbacks: healthy
        wait_for(lambda: _status(registry, rid_bad) == "stopped", what="the automatic stop")
        n2, n3 = len(_passes(tmp_path, "g2")), len(_passes(tmp_path, "g3"))
        wait_for(lambda: len(_passes(tmp_path, "g2")) > n2 + 1
                 and len(_passes(tmp_path, "g3")) > n3 + 1, what="more passes after the stop")
        assert g2.poll() is None and g3.poll() is None  # the broker restart did not end them

        # One more pass from cron: the healthy canary was judged and left running.
        res = run_cli("rollout", "guard", "--once", "--json", env=env)
        assert res.returncode == 0, res.stderr
        once = json.loads(res.stdout)
        assert [c["id"] for c in once["checked"]] == [rid_good] and once["stopped"] == []
        assert once["checked"][0]["status"] == "running"
        assert once["checked"][0]["devices"]["pi-good"] == {
            "version": "1.1.0", "inferences": 100, "bad_rate": 0.02}
        assert _stop(g2) == 0 and _stop(g3) == 0

    # pi-bad is assigned 1.0.0 again; nothing reverted pi-good (the broker keeps no
    # retained messages across its restart, so its 1.1.0 may be gone, but nothing else).
    seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
    assert seen[device_topic("pi-bad")]["version"] == "1.0.0"
    assert seen.get(device_topic("pi-good"), {"version": "1.1.0"})["version"] == "1.1.0"
    stops = [e for e in reg.audit.entries() if e["action"] == "rollout.stopped"]
    assert len(stops) == 1, stops  # two guards, one stop
    assert stops[0]["actor"] == "rollout-guard" and stops[0]["details"]["automatic"]
    assert stops[0]["details"]["rollout"] == rid_bad
    assert "rate 0.42 > 0.20 over 40 inferences" in stops[0]["details"]["reason"]
    assert reg.audit.verify().entries == len(reg.audit.entries())
    assert _status(registry, rid_good) == "running"
