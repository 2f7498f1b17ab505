"""The update protocol (edgefleet.device.wire.updates): both ends read and write through it."""

from __future__ import annotations

import json

import pytest

from edgefleet.device.core.errors import UpdateRejected
from edgefleet.device.wire import updates as wire


def test_assignment_round_trip() -> None:
    a = wire.Assignment("digits-mlp", "1.2.0", shadow=True, rollout="abc123")
    payload = a.encode()
    # The v1 bytes every deployed device reads: no "v" field, this key order.
    assert json.loads(payload) == {"model": "digits-mlp", "version": "1.2.0",
                                   "rollout": "abc123", "shadow": True}
    assert wire.decode_assignment(payload) == a
    assert a.target == wire.target_path("digits-mlp", "1.2.0") == "digits-mlp/1.2.0.tar"
    assert wire.decode_assignment(b"") is None  # an empty retained message clears
    assert wire.decode_assignment(b'{"v": 1, "model": "m", "version": "2"}') == \
        wire.Assignment("m", "2")


@pytest.mark.parametrize(("payload", "match"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"version": "1.0.0"}', "bad model name"),
    (b'{"model": "../x", "version": "1.0.0"}', "bad model name"),
    (b'{"model": "m", "version": "1.0.0; rm"}', "bad version"),
    (b'{"model": "m", "version": 1}', "bad version"),
    # `$` in a pattern also matches before a final newline: every check is a full match
    (b'{"model": "m\\n", "version": "1.0.0"}', "bad model name"),
    (b'{"model": "m", "version": "1.0.0\\n"}', "bad version"),
    (b'{"v": 2, "model": "m", "version": "1.0.0"}', "unknown assignment version"),
    (b'{"v": true, "model": "m", "version": "1.0.0"}', "unknown assignment version"),
])
def test_malformed_assignments_are_refused(payload: bytes, match: str) -> None:
    with pytest.raises(UpdateRejected, match=match) as exc:
        wire.decode_assignment(payload)
    assert exc.value.reason == "bad_assignment"


def test_oversized_assignment_is_refused_before_parsing() -> None:
    big = b'{"model": "m", "version": "1.0.0", "pad": "' + b"x" * wire.MAX_ASSIGNMENT_BYTES + b'"}'
    with pytest.raises(UpdateRejected) as exc:
        wire.decode_assignment(big)
    assert exc.value.reason == "too_large"


def test_the_server_cannot_encode_what_a_device_refuses() -> None:
    with pytest.raises(UpdateRejected, match="bad model name"):
        wire.Assignment("a/b", "1.0.0").encode()
    with pytest.raises(UpdateRejected, match="sha256"):
        wire.Assignment("m", "1.0.0", sha256="a" * 64 + "\n")


def test_topics_and_reports() -> None:
    assert wire.device_topic("pi-1").startswith(wire.ASSIGN_ROOT)
    assert wire.device_of(wire.state_topic("pi-1")) == ("state", "pi-1")
    assert wire.device_of(wire.event_topic("pi-1")) == ("event", "pi-1")
    assert wire.device_of(wire.FLEET_TOPIC) is None
    assert wire.device_of("edgefleet/v1/pi-1/metrics") is None
    event = wire.decode_report(wire.encode_event("pi-1", "rejected", reason="rollback"))
    assert event is not None and (event["device"], event["event"], event["reason"]) == (
        "pi-1", "rejected", "rollback")
    assert wire.decode_report(wire.encode_state({"version": "1.0.0"})) == {"version": "1.0.0"}
    assert wire.decode_report(b"[]") is None and wire.decode_report(b"{x") is None


def test_hostile_assignments_and_reports_are_refused_not_raised() -> None:
    from edgefleet.device.core.guarded_json import JsonRejected

    deep = b"[" * 2000 + b"]" * 2000  # a naive json.loads raises RecursionError here
    for payload in (deep, b'{"model": "m", "version": NaN}', b'{"model": "m", "version": '
                    b'"1", "x": ' + b"[" * 10 + b"]" * 10 + b"}"):
        with pytest.raises(UpdateRejected, match="within limits"):
            wire.decode_assignment(payload)
    assert wire.decode_report(deep) is None
    with pytest.raises(JsonRejected) as info:
        wire.read_report("pi-1", b'{"device": "pi-2", "event": "rolled_back"}')
    assert info.value.reason == "device_mismatch"
    assert wire.read_report("pi-1", b'{"event": "activated"}')["device"] == "pi-1"
