"""The mosquitto child process: starts on a free port, carries messages, restarts in place."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from edgefleet.server.fleet.broker import MosquittoBroker


def _roundtrip(port: int) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, msg: (got.append(msg.payload), done.set())
    c.connect("127.0.0.1", port)
    c.subscribe("t/x", qos=1)
    c.loop_start()
    try:
        c.publish("t/x", b"hello", qos=1).wait_for_publish(5)
        assert done.wait(5)
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def test_broker_roundtrip_and_restart(mosquitto: MosquittoBroker) -> None:
    assert _roundtrip(mosquitto.port) == b"hello"
    port = mosquitto.port
    mosquitto.kill()
    mosquitto.start()
    assert mosquitto.port == port
    assert _roundtrip(mosquitto.port) == b"hello"
