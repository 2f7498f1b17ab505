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
        _publish(mosquitto.port, state_topic("pi-1"), {
        "version": "1.0.0", "highest_seen": {"models": {"m": "2.0.0", "n": "9.9.9\n"}}})
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


def _publish_raw(port: int, topic: str, payload: bytes, retain: bool) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_hostile_states_and_events_are_refused_counted_and_quarantined(mosquitto: Any) -> None:
    deep = b"[" * 20_000 + b"]" * 20_000
    _publish_raw(mosquitto.port, state_topic("pi-evil"), deep, retain=True)
    _publish_raw(mosquitto.port, state_topic("pi-liar"),
                 json.dumps({"device": "pi-1", "version": "6.6.6"}).encode(), retain=True)
    _publish(mosquitto.port, state_topic("pi-1"), {
        "version": "1.0.0", "highest_seen": {"models": {"m": "2.0.0", "n": "9.9.9\n"}}})
    view = FleetView("127.0.0.1", mosquitto.port)
    try:
        wait_for(lambda: view.fleet(0) == {"pi-1": "1.0.0"}
                 and len(view.quarantine) == 2, what="the retained states")
        forged = {"device": "pi-1", "event": "rolled_back", "ts": time.time()}
        _publish_raw(mosquitto.port, "edgefleet/v1/update/event/pi-evil",
                     json.dumps(forged).encode(), retain=False)
        _publish_raw(mosquitto.port, "edgefleet/v1/update/event/pi-1",
                     json.dumps({"event": "activated", "ts": time.time()}).encode(), False)
        wait_for(lambda: len(view.quarantine) == 3 and len(view.events) == 1,
                 what="the events")
        assert view.highest("pi-1", "m") == "2.0.0"
        assert view.highest("pi-1", "n") is None  # a version must match whole
        h = view.health("pi-1")
        assert h is not None and not h.rolled_back  # the forged event did not count
        assert view.events[0]["device"] == "pi-1"  # the topic's device, filled in
        assert view.rejected() == {"too_deep": 1, "device_mismatch": 2}
        q = sorted(view.quarantine, key=lambda r: r["topic"])
        assert [(r["device"], r["topic"], r["reason"]) for r in q] == [
            ("pi-evil", "edgefleet/v1/update/event/pi-evil", "device_mismatch"),
            ("pi-evil", state_topic("pi-evil"), "too_deep"),
            ("pi-liar", state_topic("pi-liar"), "device_mismatch")]
        assert q[1]["prefix"] == "[" * 256 and q[1]["size"] == len(deep)
        assert view.link.metrics.counter("rollout_view_callback_errors") == 0
    finally:
        view.close()


def test_a_rollback_counts_for_its_own_device_only_and_since_the_rollout(mosquitto: Any
                                                                          ) -> None:
    for d in ("pi-1", "pi-2", "pi-3"):
        _publish(mosquitto.port, state_topic(d), {"version": "1.1.0"})
    view = FleetView("127.0.0.1", mosquitto.port)
    try:
        wait_for(lambda: len(view.fleet(0)) == 3, what="the retained states")
        start = time.time()
        sent = [("pi-1", "installed", start + 1), ("pi-2", "rolled_back", start + 1),
                ("pi-3", "rejected", start - 100), ("pi-1", "activated", start + 2)]
        for d, event, ts in sent:
            _publish_raw(mosquitto.port, f"edgefleet/v1/update/event/{d}",
                         json.dumps({"event": event, "ts": ts}).encode(), retain=False)
        wait_for(lambda: len(view.events) == 4, what="the events")
        assert [e["event"] for e in view.events.of("pi-1")] == ["installed", "activated"]
        flags = {d: h.rolled_back for d in ("pi-1", "pi-2", "pi-3")
                 if (h := view.health(d, since=start)) is not None}
        # pi-3 refused before the rollout began: not this rollout's refusal
        assert flags == {"pi-1": False, "pi-2": True, "pi-3": False}
        h3 = view.health("pi-3", since=0.0)
        assert h3 is not None and h3.rolled_back
    finally:
        view.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_is_noticed_and_replaced(mosquitto: Any) -> None:
    view = FleetView("127.0.0.1", mosquitto.port)
    try:
        real_step = view.link.step
        calls = {"n": 0}

        def dying_step(timeout: float = 0.05) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise SystemExit("the network thread dies")
            real_step(timeout)

        view.link.step = dying_step  # type: ignore[method-assign]
        wait_for(lambda: not view._net.alive, what="the thread to die")
        assert not view.connected  # it says so (and starts a new thread)
        wait_for(lambda: view.connected, what="a new thread reconnecting")
        assert view.metrics.counter("rollout_view_thread_restarts") == 1
        _publish(mosquitto.port, state_topic("pi-9"), {"version": "2.0.0"})
        wait_for(lambda: view.fleet(0).get("pi-9") == "2.0.0", what="subscribed again")
    finally:
        view.close()
