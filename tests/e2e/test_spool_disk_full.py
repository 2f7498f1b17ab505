"""A device whose disk fills up while it is offline still delivers what it had spooled.

The spool lives on a 512 KiB tmpfs that is filled to the last byte; the device keeps
publishing (nothing may raise), then a real mosquitto comes within reach, and every
message the spool still holds must arrive. After the disk is freed, new messages are
spooled and delivered without further drops.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.broker import MosquittoBroker
from tests.support.telemetry import raw_client, wait_until
from tests.support.tmpfs import fill, small_tmpfs

pytestmark = [pytest.mark.e2e, pytest.mark.fault]

DEVICE = "dev-full"
PAD = "x" * 900  # ~1.1 KB messages: a few hundred fit on the disk


class Received:
    """Sequence numbers that reached the broker, from a subscriber of the device's events."""

    def __init__(self, port: int) -> None:
        self.seqs: set[int] = set()
        self._lock = threading.Lock()
        self.client = raw_client(port, client_id="watcher")
        self.client.on_message = self._message
        self.client.subscribe(f"edgefleet/v1/{DEVICE}/event", qos=1)

    def _message(self, _c: object, _u: object, msg: object) -> None:
        seq = int(json.loads(msg.payload)["seq"])  # type: ignore[attr-defined]
        with self._lock:
            self.seqs.add(seq)

    def has(self, seqs: set[int]) -> bool:
        with self._lock:
            return seqs <= self.seqs

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _publish(pub: TelemetryPublisher, m: Metrics, n: int, refused: set[int]) -> list[int]:
    """Publish ``n`` events; note the ones the spool could not store at all."""
    seqs = []
    for i in range(n):
        before = m.counter("telemetry_spool_disk_full")
        seq = pub.publish("event", {"kind": "tick", "i": i, "pad": PAD})
        if m.counter("telemetry_spool_disk_full") > before:
            refused.add(seq)
        seqs.append(seq)
    return seqs


@pytest.mark.timeout(120)
def test_full_disk_keeps_spool_and_delivers(tmp_path: Path,
                                            mosquitto: MosquittoBroker) -> None:
    watcher = Received(mosquitto.port)
    with small_tmpfs(tmp_path / "disk") as disk:
        m = Metrics()
        spool = Spool(disk / "spool.db", reserve_bytes=64 * 1024, metrics=m)
        pub = TelemetryPublisher(DEVICE, MqttConfig(port=mosquitto.port, backoff_base=0.05,
                                                    backoff_cap=0.5), spool, metrics=m)
        try:
            refused: set[int] = set()
            seqs = _publish(pub, m, 60, refused)  # offline: the publisher is not running
            assert not refused and spool.count() == 60
            assert fill(disk / "filler") > 0
            seqs += _publish(pub, m, 300, refused)  # the disk is full: nothing raises
            assert m.counter("telemetry_spool_disk_full_retries") >= 1
            held = [json.loads(p)["seq"] for _, _, p in spool.pending(0, 10_000)]
            stored = [s for s in seqs if s not in refused]
            evicted = stored[:len(stored) - len(held)]
            assert evicted and held == stored[len(evicted):]  # only the oldest were dropped
            assert spool.dropped() == m.counter("telemetry_spool_dropped") \
                == len(evicted) + len(refused) > 0
            assert m.counter("telemetry_spool_disk_full") == len(refused)
            assert m.counter("telemetry_spooled") == len(stored)

            pub.start()  # the broker is reachable: everything held is delivered
            assert pub.drain(30), f"{spool.count()} messages still spooled on a full disk"
            assert wait_until(lambda: watcher.has(set(held)), 10)
            assert not watcher.has({evicted[-1]})  # dropped really means not sent

            (disk / "filler").unlink()  # space comes back: no more drops
            dropped = spool.dropped()
            more = _publish(pub, m, 40, refused)
            assert spool.dropped() == dropped
            assert m.counter("telemetry_spool_disk_recovered") == 1
            assert pub.drain(30)
            assert wait_until(lambda: watcher.has(set(more)), 10)
        finally:
            pub.stop()
            spool.close()
            watcher.close()
