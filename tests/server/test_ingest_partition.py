"""K ingest workers split the fleet by device, each on its own persistent session.

Also pins down why the ingest does not use ``$share`` groups: the installed mosquitto
does not keep shared subscriptions across a restart, and a publish that arrives before
the group re-subscribes is accepted with "no matching subscribers" and read by nobody.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.wire.telemetry import Envelope, encode, topic_for
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.telemetry.ingest import IngestConfig, partition_of
from edgefleet.server.telemetry.store import open_store
from tests.support.telemetry import as_root_extra, raw_client, running_ingest, wait_until


def test_partition_is_crc32_stable_and_balanced() -> None:
    assert partition_of("pi-07", 4) == zlib.crc32(b"pi-07") % 4
    assert all(partition_of(f"dev-{i}", 1) == 0 for i in range(50))
    counts = Counter(partition_of(f"pi-{i:05d}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) < 1.15 * 1000, counts


def test_worker_config_names_its_session_and_refuses_shared() -> None:
    assert IngestConfig().session_id == "edgefleet-ingest"
    assert IngestConfig(workers=4, worker=2).session_id == "edgefleet-ingest-2of4"
    with pytest.raises(ValueError, match=r"worker must be 0\.\.1"):
        IngestConfig(workers=2, worker=2)
    with pytest.raises(ValueError, match=r"mosquitto 2\.0 does not restore them"):
        IngestConfig(shared=True)


def test_cli_refuses_a_bad_worker_spec(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    res = run_cli("ingest", "run", "--db", str(tmp_path / "f.db"), "--worker", "2/2",
                  "--duration", "0.1")
    assert res.returncode == ConfigError.exit_code, res.stderr
    assert "worker must be 0..1" in res.stderr
    res = run_cli("ingest", "run", "--db", str(tmp_path / "f.db"), "--worker", "two")
    assert res.returncode == 64 and "--worker must be I/K" in res.stderr


def _envelope(device: str, seq: int) -> bytes:
    return encode(Envelope(v=1, device=device, boot="ab" * 8, seq=seq, ts=time.time(),
                           kind="event", body={"kind": "tick"}))


def test_two_workers_store_each_device_once(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    store = open_store(tmp_path / "fleet.db")
    devices = [f"dev-{i:02d}" for i in range(12)]
    mine = {w: [d for d in devices if partition_of(d, 2) == w] for w in (0, 1)}
    assert mine[0] and mine[1]
    with running_ingest(store, mosquitto.port, workers=2, worker=0, metrics=Metrics()) as w0, \
            running_ingest(store, mosquitto.port, workers=2, worker=1,
                           metrics=Metrics()) as w1:
        pub = raw_client(mosquitto.port)
        for d in devices:
            for seq in range(1, 6):
                pub.publish(topic_for(d, "event"), _envelope(d, seq), qos=1).wait_for_publish(5)
        # refused by the worker that owns "bad topic"; no device part at all: worker 0
        pub.publish("edgefleet/v1/bad topic/metrics", b"{}", qos=1).wait_for_publish(5)
        pub.publish("edgefleet/v1//metrics", b"{}", qos=1).wait_for_publish(5)
        assert wait_until(lambda: store.message_stats()["rows"] >= 60, 20)
        assert wait_until(lambda: w0.rejected + w1.rejected >= 2, 10)
        time.sleep(0.3)
    stats = store.message_stats()
    assert stats["rows"] == stats["distinct"] == 60
    assert (w0.stored, w1.stored) == (5 * len(mine[0]), 5 * len(mine[1]))
    bad_owner = partition_of("bad topic", 2)
    assert (w0.rejected, w1.rejected) == ((2, 0) if bad_owner == 0 else (1, 1))
    # each saw the other's messages and acknowledged them unread
    assert w0.skipped == 5 * len(mine[1]) + (bad_owner == 1)
    assert w1.skipped == 5 * len(mine[0]) + 1 + (bad_owner == 0)
    assert {m["device"] for m in store.messages(limit=100)} == set(devices)
    assert sum(store.rejects().values()) == 2


class _Session:
    """A persistent MQTT 5 session that records what it receives."""

    def __init__(self, port: int, client_id: str) -> None:
        self.got: list[str] = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        self.c.on_message = lambda _c, _u, m: self.got.append(m.topic)
        self.subacks = threading.Semaphore(0)
        self.c.on_subscribe = lambda *_a: self.subacks.release()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        ok = threading.Event()
        self.c.on_connect = lambda *_a: ok.set()
        self.c.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.c.loop_start()
        assert ok.wait(5)

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the SUBACK (a loaded machine is slow, never wrong)."""
        self.c.subscribe(topic, qos=1)
        assert self.subacks.acquire(timeout=10)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _puback_reason(port: int, topic: str) -> int:
    reasons: list[Any] = []
    c = raw_client(port)
    c.on_publish = lambda _c, _u, _mid, rc, _p: reasons.append(rc)
    c.publish(topic, b"x", qos=1).wait_for_publish(5)
    assert wait_until(lambda: bool(reasons), 5)
    c.disconnect()
    c.loop_stop()
    return int(reasons[0].value)


def test_mosquitto_forgets_shared_subscriptions_across_a_restart(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "b", BrokerConfig(persistence=True,
                                                          extra=as_root_extra())).start()
    try:
        shared, plain = _Session(broker.port, "grp-member"), _Session(broker.port, "plain")
        shared.subscribe("$share/g/s/#")
        plain.subscribe("p/#")
        assert _puback_reason(broker.port, "s/1") == 0  # the group is there
        shared.close()
        plain.close()
        broker.stop()  # SIGTERM: mosquitto writes its persistence file
        broker.start()
        # Nobody has reconnected yet: only the ordinary subscription came back.
        assert _puback_reason(broker.port, "p/2") == 0
        assert _puback_reason(broker.port, "s/2") == 16, (
            "mosquitto now restores shared subscriptions: $share groups may be "
            "reconsidered for the ingest (docs/telemetry.md)")
        shared, plain = _Session(broker.port, "grp-member"), _Session(broker.port, "plain")
        assert wait_until(lambda: plain.got == ["p/2"], 5)
        time.sleep(0.5)
        # s/2 is gone for good (s/1 may come back: it was queued in the session before)
        assert "s/2" not in shared.got
        shared.close()
        plain.close()
    finally:
        broker.kill()


def test_ingest_config_file_with_workers(tmp_path: Path) -> None:
    from edgefleet.device.core.config import StrictModel, load_config

    class _File(StrictModel):
        ingest: IngestConfig = IngestConfig()

    f = tmp_path / "ingest.toml"
    f.write_text("[ingest]\nworkers = 3\nworker = 1\n")
    cfg = load_config(_File, [f]).ingest
    assert (cfg.worker, cfg.workers, cfg.session_id) == (1, 3, "edgefleet-ingest-1of3")
    f.write_text("[ingest]\nshared = true\n")
    with pytest.raises(ConfigError, match="shared subscriptions were removed"):
        load_config(_File, [f])
    assert json.dumps(cfg.model_dump(mode="json"))


def test_forget_deletes_a_retired_workers_session_and_queue(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    broker = MosquittoBroker(tmp_path / "b", BrokerConfig(extra=as_root_extra())).start()
    try:
        store = open_store(tmp_path / "fleet.db")
        dev = next(f"d{i}" for i in range(100) if partition_of(f"d{i}", 2) == 1)
        with running_ingest(store, broker.port, workers=2, worker=1):
            pass  # the session 1of2 exists now, subscribed
        pub = raw_client(broker.port)
        pub.publish(topic_for(dev, "event"), _envelope(dev, 1), qos=1).wait_for_publish(5)
        res = run_cli("ingest", "forget", "--worker", "1/2",
                      "--broker", f"127.0.0.1:{broker.port}")
        assert res.returncode == 0, res.stderr
        assert "edgefleet-ingest-1of2 deleted" in res.stdout
        pub.publish(topic_for(dev, "event"), _envelope(dev, 2), qos=1).wait_for_publish(5)
        with running_ingest(store, broker.port, workers=2, worker=1) as w1:
            pub.publish(topic_for(dev, "event"), _envelope(dev, 3), qos=1).wait_for_publish(5)
            assert wait_until(lambda: w1.stored >= 1, 10)
            time.sleep(0.5)
        # seq 1 was queued in the deleted session, seq 2 found no session: only 3 stored
        assert [m["seq"] for m in store.messages(device=dev)] == [3]
        pub.disconnect()
        pub.loop_stop()
    finally:
        broker.kill()
