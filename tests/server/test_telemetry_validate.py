"""Every way a telemetry message can be refused has a named reason."""

from __future__ import annotations

import json

import pytest

from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message


def env(**over: object) -> bytes:
    base = {"v": 1, "device": "d1", "boot": "0123456789abcdef", "seq": 1, "ts": 1.0,
            "kind": "metrics", "body": {"inferences": 3}}
    base.update(over)
    return json.dumps(base).encode()


def test_valid_metrics_event_and_status() -> None:
    ok = validate_message("edgefleet/v1/d1/metrics", env())
    assert isinstance(ok, Accepted) and ok.metrics is not None and ok.metrics.inferences == 3
    ev = validate_message("edgefleet/v1/d1/event", env(kind="event", body={"kind": "x"}))
    assert isinstance(ev, Accepted) and ev.envelope is not None
    st = validate_message("edgefleet/v1/d1/status", json.dumps(
        {"v": 1, "device": "d1", "boot": "0123456789abcdef", "state": "online", "ts": 2.0}
    ).encode())
    assert isinstance(st, Accepted) and st.status is not None and st.status.state == "online"


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("edgefleet/v1/d1/other", env(), "bad_topic"),
    ("edgefleet/v2/d1/metrics", env(), "bad_topic"),
    ("edgefleet/v1/d1/metrics", b"x" * 70_000, "oversized"),
    ("edgefleet/v1/d1/metrics", b"{not json", "malformed"),
    ("edgefleet/v1/d1/metrics", b"\xff\xfe", "malformed"),
    ("edgefleet/v1/d1/metrics", b"[1, 2]", "malformed"),
    ("edgefleet/v1/d1/metrics", env(v=2), "unknown_schema"),
    ("edgefleet/v1/d1/metrics", b"{}", "unknown_schema"),
    ("edgefleet/v1/d1/metrics", env(device="d2"), "device_mismatch"),
    ("edgefleet/v1/d1/metrics", env(seq=0), "invalid"),
    ("edgefleet/v1/d1/metrics", env(boot="XYZ"), "invalid"),
    ("edgefleet/v1/d1/metrics", env(extra=1), "invalid"),
    ("edgefleet/v1/d1/metrics", env(body={"inferences": "many"}), "invalid"),
    ("edgefleet/v1/d1/event", env(), "invalid"),  # kind does not match the topic
])
def test_rejections(topic: str, payload: bytes, reason: str) -> None:
    res = validate_message(topic, payload)
    assert isinstance(res, Rejected), res
    assert res.reason == reason, res.detail
