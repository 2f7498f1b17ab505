"""End to end through a real mosquitto: no message lost, none stored twice.

QoS 1 plus the device spool plus dedupe on (device, boot, seq) must give exactly-once
rows in the store while the broker restarts, the device is cut off, the ingest restarts,
and the device process is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.telemetry.store import Store, open_store
from tests.support.telemetry import as_root_extra, running_ingest, wait_until

N = 10_000
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.fault]


def _broker(tmp_path: Path) -> MosquittoBroker:
    # persistence: the ingest's queued messages survive a broker restart (saved on SIGTERM)
    return MosquittoBroker(tmp_path / "broker", BrokerConfig(
        persistence=True, extra=as_root_extra())).start()


class Producer(threading.Thread):
    """Spools N events at a steady pace whatever the connection is doing."""

    def __init__(self, pub: TelemetryPublisher, n: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.pub, self.n, self.seconds = pub, n, seconds
        self.done = 0

    def run(self) -> None:
        chunk = 50
        pause = self.seconds / (self.n / chunk)
        while self.done < self.n:
            for _ in range(min(chunk, self.n - self.done)):
                self.pub.publish("event", {"kind": "tick", "i": self.done})
                self.done += 1
            time.sleep(pause)


def _assert_exactly_once(store: Store, device: str, boot: str, n: int) -> None:
    stats = store.message_stats(device)
    seqs = sorted(m["seq"] for m in store.messages(device=device, limit=n + 10)
                  if m["boot"] == boot)
    assert stats["rows"] == stats["distinct"] == n, stats
    assert seqs == list(range(1, n + 1))


@pytest.mark.timeout(180)
def test_10k_with_broker_restarts_and_cutoff(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    store = open_store(tmp_path / "fleet.db")
    m = Metrics()
    pub = TelemetryPublisher("dev-a", MqttConfig(port=broker.port, backoff_base=0.05,
                                                 backoff_cap=0.5),
                             Spool(tmp_path / "spool.db"), metrics=m).start()
    try:
        # mosquitto 2.0 does not restore *shared* subscriptions from persistence, so
        # across broker restarts the ingest uses its exclusive persistent subscription.
        with running_ingest(store, broker.port, shared=False) as ing:
            prod = Producer(pub, N, seconds=6.0)
            prod.start()
            for _ in range(2):  # killed and restarted twice
                time.sleep(1.0)
                broker.stop()
                time.sleep(0.3)
                broker.start()
            time.sleep(0.5)
            broker.stop()  # the device is cut off for a while; it keeps spooling
            time.sleep(2.0)
            assert pub.spool.count() > 0
            broker.start()
            prod.join(30)
            assert prod.done == N
            assert pub.drain(60), f"{pub.spool.count()} messages still spooled"
            assert wait_until(lambda: store.message_stats("dev-a")["rows"] >= N, 60)
            time.sleep(0.5)  # anything redelivered late would show up as a dup row
            _assert_exactly_once(store, "dev-a", pub.boot_id, N)
            assert m.counter("telemetry_connects") >= 4  # it really reconnected
            assert ing.stored == N
    finally:
        pub.stop()
        broker.kill()


@pytest.mark.timeout(180)
def test_10k_with_ingest_restarts(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    store = open_store(tmp_path / "fleet.db")
    pub = TelemetryPublisher("dev-b", MqttConfig(port=broker.port), Spool(tmp_path / "s.db"),
                             metrics=Metrics()).start()
    try:
        prod = Producer(pub, N, seconds=5.0)
        with running_ingest(store, broker.port):
            prod.start()
            time.sleep(1.0)
        for _ in range(2):  # the ingest is down; the broker queues for its session
            time.sleep(0.7)
            with running_ingest(store, broker.port):
                time.sleep(0.7)
        prod.join(30)
        assert pub.drain(30)
        with running_ingest(store, broker.port):
            assert wait_until(lambda: store.message_stats("dev-b")["rows"] >= N, 60)
            time.sleep(0.5)
        _assert_exactly_once(store, "dev-b", pub.boot_id, N)
    finally:
        pub.stop()
        broker.kill()


@pytest.mark.timeout(180)
def test_sigkilled_device_delivers_its_spool(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    store = open_store(tmp_path / "fleet.db")
    spool = tmp_path / "device" / "spool.db"
    cmd = [sys.executable, "-m", "tests.support.telemetry_device", "--port", str(broker.port),
           "--spool", str(spool), "--device", "dev-c"]
    try:
        with running_ingest(store, broker.port):
            proc = subprocess.Popen([*cmd, "--count", "6000"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, env={**os.environ})
            assert proc.stdout is not None
            boot, last, cut = "", 0, False
            for line in proc.stdout:
                _, seq, boot = line.split()
                last = int(seq)
                if last == 1500:
                    broker.stop()  # some of the stream stays in the spool...
                    cut = True
                if cut and last >= 3000:
                    proc.send_signal(signal.SIGKILL)  # ...when the device dies
                    break
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
            assert last >= 3000
            broker.start()
            # Restarted with nothing new to say: it only flushes the old spool.
            again = subprocess.run([*cmd, "--count", "0"], cwd=ROOT, text=True,
                                   capture_output=True, timeout=120, check=False)
            assert "drained" in again.stdout, again.stderr[-2000:]
            assert wait_until(lambda: store.message_stats("dev-c")["rows"] >= last, 60)
            time.sleep(0.5)
        got = sorted(m["seq"] for m in store.messages(device="dev-c", limit=10_000)
                     if m["boot"] == boot)
        stats = store.message_stats("dev-c")
        assert stats["rows"] == stats["distinct"]
        # every message the killed process had committed to its spool arrived
        assert got[:last] == list(range(1, last + 1))
    finally:
        broker.kill()
