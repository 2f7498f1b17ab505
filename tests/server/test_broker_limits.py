"""The generated mosquitto config's bounds, enforced by a real mosquitto (issue 15).

One client sending a packet above the protocols' maximum is disconnected before the broker
buffers it, while another device's messages keep arriving; a subscriber's queue of
undelivered messages is capped in bytes.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.device.wire import scoring, telemetry
from edgefleet.server.fleet.broker import (
    MAX_PACKET_BYTES,
    MAX_QUEUED_BYTES,
    BrokerConfig,
    MosquittoBroker,
)
from tests.support.telemetry import raw_client, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    return struct.pack(">H", len(s)) + s.encode()


def _raw_connect(port: int, client_id: str) -> socket.socket:
    """An MQTT 3.1.1 client by hand: no client library can refuse to send what we want."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    var = _str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 60) + _str(client_id)
    s.sendall(b"\x10" + _varint(len(var)) + var)
    connack = s.recv(4)
    assert connack[:1] == b"\x20" and connack[3:4] == b"\x00", connack
    return s


def _raw_publish(s: socket.socket, topic: str, payload: bytes) -> None:
    body = _str(topic) + payload
    s.sendall(b"\x30" + _varint(len(body)) + body)


def _closed(s: socket.socket, timeout: float = 10.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class _Inbox:
    def __init__(self, port: int, topic: str, client_id: str = "inbox") -> None:
        self.got: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = raw_client(port, client_id)
        self.client.on_message = self._on
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5)

    def _on(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.got.append((msg.topic, msg.payload))

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.got if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_limits_are_derived_from_the_wire_maxima(tmp_path: Path) -> None:
    largest = max(telemetry.MAX_PAYLOAD_BYTES, scoring.MAX_REQUEST_BYTES,
                  scoring.MAX_REPLY_BYTES)
    assert largest < MAX_PACKET_BYTES <= largest + 8192
    assert MAX_QUEUED_BYTES >= 1000 * MAX_PACKET_BYTES
    broker = MosquittoBroker(tmp_path / "b")
    conf = broker._write_config().read_text().splitlines()
    for line in (f"max_packet_size {MAX_PACKET_BYTES}", f"max_queued_bytes {MAX_QUEUED_BYTES}",
                 "max_queued_messages 100000", "max_inflight_messages 20"):
        assert line in conf


def test_oversize_packet_disconnects_only_its_sender(mosquitto: MosquittoBroker) -> None:
    port = mosquitto.port
    inbox = _Inbox(port, "edgefleet/v1/+/metrics")
    good = raw_client(port, "dev-good")
    hostile = _raw_connect(port, "dev-evil")
    try:
        for i in range(20):
            good.publish("edgefleet/v1/dev-good/metrics", b"m%d" % i, qos=1).wait_for_publish(5)
        # The largest payload a protocol allows still goes through (the limit is not tight).
        _raw_publish(hostile, "edgefleet/v1/dev-evil/metrics", b"x" * scoring.MAX_REQUEST_BYTES)
        assert wait_until(lambda: len(inbox.payloads("edgefleet/v1/dev-evil/metrics")) == 1, 10)
        # One byte over the packet limit: the broker hangs up on this client only.
        _raw_publish(hostile, "edgefleet/v1/dev-evil/metrics", b"y" * MAX_PACKET_BYTES)
        assert _closed(hostile), "mosquitto kept the oversize sender connected"
        for i in range(20, 40):
            good.publish("edgefleet/v1/dev-good/metrics", b"m%d" % i, qos=1).wait_for_publish(5)
        assert wait_until(lambda: len(inbox.payloads("edgefleet/v1/dev-good/metrics")) == 40, 10)
        assert inbox.payloads("edgefleet/v1/dev-good/metrics") == [b"m%d" % i for i in range(40)]
        assert good.is_connected()
        time.sleep(0.3)
        assert inbox.payloads("edgefleet/v1/dev-evil/metrics") == [
            b"x" * scoring.MAX_REQUEST_BYTES]
    finally:
        hostile.close()
        good.loop_stop()
        good.disconnect()
        inbox.close()


def test_queue_of_an_offline_subscriber_is_capped_in_bytes(tmp_path: Path) -> None:
    """A persistent session (the ingest's) away while one device floods: the broker keeps
    at most ``max_queued_bytes`` for it, then drops (and still delivers what it kept)."""
    cap = 200_000
    broker = MosquittoBroker(tmp_path / "b", BrokerConfig(max_queued_bytes=cap)).start()
    try:
        props_client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ingest",
                                   protocol=mqtt.MQTTv5)
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        got: list[bytes] = []
        props_client.on_message = lambda _c, _u, m: got.append(m.payload)
        subscribed = threading.Event()
        props_client.on_subscribe = lambda *_a: subscribed.set()
        props_client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        props_client.loop_start()
        props_client.subscribe("edgefleet/v1/+/metrics", qos=1)
        assert subscribed.wait(5)
        props_client.disconnect()
        props_client.loop_stop()

        flood = raw_client(broker.port, "dev-flood")
        for i in range(40):  # 40 × 50 kB = 2 MB sent, 200 kB may wait
            flood.publish("edgefleet/v1/dev-flood/metrics", bytes([i]) * 50_000,
                          qos=1).wait_for_publish(5)
        flood.loop_stop()
        flood.disconnect()

        props_client.connect("127.0.0.1", broker.port, clean_start=False, properties=props)
        props_client.loop_start()
        wait_until(lambda: len(got) >= 4, 5)
        time.sleep(0.5)
        props_client.loop_stop()
        props_client.disconnect()
        # Without the cap all 40 would wait for it (max_queued_messages is 100000).
        assert 1 <= len(got) < 40
        assert sum(map(len, got)) <= cap + 50_000  # mosquitto stops once it is exceeded
    finally:
        broker.kill()
