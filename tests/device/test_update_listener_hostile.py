"""The update listener against hostile retained assignments, through a real mosquitto."""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.updates.listener import UpdateAgent
from edgefleet.device.wire.updates import FLEET_TOPIC, Assignment, device_topic, state_topic
from tests.support.telemetry import raw_client, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


class FakeUpdater:
    """What the listener needs of an Updater; records what it was asked to apply."""

    def __init__(self) -> None:
        self.applied: list[Assignment] = []
        self.events: Any = None
        self.slots = SimpleNamespace(active=lambda: ("a", None))
        self.serving = SimpleNamespace(shadow=None, shadow_agreement=lambda: None,
                                       shadow_latency_ms=lambda: None, health=lambda: {})
        self.tuf = SimpleNamespace(highest=SimpleNamespace(versions={}, models={}))
        self.done = threading.Event()

    def apply(self, a: Assignment) -> str:
        self.applied.append(a)
        self.done.set()
        return "activated"


def test_hostile_retained_assignments_are_counted_and_the_next_good_one_applies(
        mosquitto: Any) -> None:
    ops = raw_client(mosquitto.port, "operator")
    deep = b"[" * 20_000 + b"]" * 20_000
    ops.publish(device_topic("pi-1"), deep[:4000], qos=1, retain=True).wait_for_publish(5)
    ops.publish(FLEET_TOPIC, b'{"model": "m", "version": NaN}', qos=1,
                retain=True).wait_for_publish(5)
    m = Metrics()
    upd = FakeUpdater()
    states: list[bytes] = []
    spy = raw_client(mosquitto.port, "spy")
    spy.on_message = lambda _c, _u, msg: states.append(msg.payload)
    spy.subscribe(state_topic("pi-1"), qos=1)
    agent = UpdateAgent("pi-1", upd, MqttConfig(port=mosquitto.port), metrics=m,  # type: ignore[arg-type]
                        state_interval=0.2).start()
    try:
        assert wait_until(lambda: m.counter("update_assignment_invalid") == 2, 10)
        assert upd.applied == []
        ops.publish(device_topic("pi-1"), Assignment("m", "1.2.0").encode(), qos=1,
                    retain=True).wait_for_publish(5)
        assert upd.done.wait(10)
        assert upd.applied == [Assignment("m", "1.2.0")]
        assert wait_until(lambda: any(json.loads(s).get("last", {}).get("outcome")
                                      == "activated" for s in states), 10)
        assert m.counter("update_callback_errors") == 0
        assert m.counter("update_message_errors") == 0
    finally:
        agent.stop()
        for c in (ops, spy):
            c.loop_stop()
            c.disconnect()
