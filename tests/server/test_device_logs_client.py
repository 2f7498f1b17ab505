"""The operator's log client against a real mosquitto and a hostile 'device': chunks of
another request, oversized, malformed or naming another device are refused and counted;
only the asked request's lines are returned."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.wire.logs import (
    MAX_RESPONSE_BYTES,
    LogLine,
    LogResponse,
    decode_request,
    request_topic,
    response_topic,
)
from edgefleet.server.fleet.broker import MosquittoBroker
from edgefleet.server.fleet.device_logs import DeviceLogsError, LogClient
from tests.support.telemetry import raw_client

pytestmark = [pytest.mark.timeout(60)]


def _hostile_device(port: int, answer: Any) -> Any:
    c = raw_client(port, "fake-dev1")

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        for payload in answer(decode_request(msg.payload)):
            c.publish(response_topic("dev1"), payload, qos=1)

    c.on_message = on_message
    acked = threading.Event()
    c.on_subscribe = lambda *_a: acked.set()
    c.subscribe(request_topic("dev1"), qos=1)
    assert acked.wait(5), "no SUBACK"
    return c


def test_client_keeps_only_its_own_valid_chunks(mosquitto: MosquittoBroker) -> None:
    def answer(req: Any) -> list[bytes]:
        line = [LogLine(1.0, "INFO", "x", "mine")]
        return [LogResponse("someone-else", "dev1", 0, [LogLine(1.0, "INFO", "x", "theirs")],
                            final=True).encode(),
                b"{" * (MAX_RESPONSE_BYTES + 1),
                b"not json",
                LogResponse(req.id, "dev2", 0, line, final=True).encode(),
                json.dumps({"v": 1, "id": req.id, "device": "dev1", "seq": 0,
                            "lines": [{"ts": 1, "level": "INFO", "logger": "x",
                                       "msg": ["nested"]}]}).encode(),
                LogResponse(req.id, "dev1", 0, line, final=True).encode()]

    dev = _hostile_device(mosquitto.port, answer)
    try:
        with LogClient(MqttConfig(port=mosquitto.port), "dev1") as client:
            got = client.fetch(timeout=10)
        assert [ln.msg for ln in got] == ["mine"]
        assert dict(client.rejected) == {"other_request": 1, "too_large": 1, "malformed": 1,
                                         "device_mismatch": 1, "bad_response": 1}
    finally:
        dev.loop_stop()
        dev.disconnect()


def test_client_reports_refusal_and_silence(mosquitto: MosquittoBroker) -> None:
    dev = _hostile_device(mosquitto.port, lambda req: [LogResponse(
        req.id, "dev1", 0, final=True, error="rate_limited", message="slow down").encode()])
    try:
        with LogClient(MqttConfig(port=mosquitto.port), "dev1") as client, \
                pytest.raises(DeviceLogsError) as e:
            client.fetch(timeout=10)
        assert e.value.reason == "rate_limited" and "slow down" in str(e.value)
    finally:
        dev.loop_stop()
        dev.disconnect()
    with LogClient(MqttConfig(port=mosquitto.port), "nobody") as client, \
            pytest.raises(DeviceLogsError) as e:
        client.fetch(timeout=1)
    assert e.value.reason == "timeout"


def test_fetch_keeps_no_more_lines_than_asked(mosquitto: MosquittoBroker) -> None:
    """A device answering a fetch with chunk after chunk, never final, does not fill the
    operator's memory: the client stops at the lines it asked for."""
    def answer(req: Any) -> list[bytes]:
        return [LogResponse(req.id, "dev1", seq, [LogLine(1.0, "INFO", "x", f"{seq}.{i}")
                                                   for i in range(4)]).encode()
                for seq in range(10)]

    dev = _hostile_device(mosquitto.port, answer)
    try:
        with LogClient(MqttConfig(port=mosquitto.port), "dev1") as client:
            got = client.fetch(lines=10, timeout=10)
        assert [ln.msg for ln in got] == [f"{s}.{i}" for s in range(3) for i in range(4)][:10]
        assert dict(client.rejected) == {"too_many_lines": 1}
    finally:
        dev.loop_stop()
        dev.disconnect()
