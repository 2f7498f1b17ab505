"""FleetView on MqttLink: reconnects by itself and subscribes again after a broker restart."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.wire.updates import Assignment, device_topic, state_topic
from edgefleet.server.rollout.fleet_view import FleetView
from tests.support.updates import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _publish(port: int, topic: str, body: dict[str, Any]) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, json.dumps(body), qos=1, retain=True).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_fleet_view_survives_a_broker_restart(mosquitto: Any) -> None:
    view = FleetView("127.0.0.1", mosquitto.port)
    try:
        _publish(mosquitto.port, state_topic("pi-1"), {"version": "1.0.0"})
        wait_for(lambda: view.fleet(0) == {"pi-1": "1.0.0"}, what="the first state")
        mosquitto.restart()
        wait_for(lambda: view.connected and view.link.generation > 1, what="the reconnect")
        _publish(mosquitto.port, state_topic("pi-2"), {"version": "1.1.0"})
        wait_for(lambda: view.fleet(0).get("pi-2") == "1.1.0",
                 what="a state after the restart (subscribed again)")
        view.publish(device_topic("pi-2"), Assignment("m", "1.1.0").encode())
        with pytest.raises(UsageError, match="refusing to publish"):
            view.publish(state_topic("pi-2"), b"{}")
    finally:
        view.close()


def test_an_unreachable_broker_fails_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(EdgefleetError, match="cannot reach the MQTT broker"):
        FleetView("127.0.0.1", port)
    assert time.monotonic() - t0 < 5
