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


@pytest.mark.parametrize(("payload", "reason"), [
    (b'{"v":1,"device":"d1","boot":"0123456789abcdef","seq":1,"ts":Infinity,'
     b'"kind":"metrics","body":{}}', "non_finite"),
    (b'{"v":1,"device":"d1","boot":"0123456789abcdef","seq":1,"ts":1.0,'
     b'"kind":"metrics","body":{"gauges":{"x":NaN}}}', "non_finite"),
    (env(body={"gauges": {"x": 1e308}}).replace(b"1e+308", b"1e999"), "non_finite"),
    (env(ts=4_102_444_800.0 * 10), "clock_skew"),
    (env(body={"a": json.loads("[" * 300 + "]" * 300)}), "too_deep"),
    (b'{"v":1,"body":' + b"[" * 50_000 + b"]" * 50_000 + b"}", "too_deep"),
    (env(body={"counters": {f"c{i}": i for i in range(3000)}}), "too_many_keys"),
    (env(body={"x": list(range(2000))}), "list_too_long"),
])
def test_hostile_payloads_are_refused_before_the_schema(payload: bytes, reason: str) -> None:
    res = validate_message("edgefleet/v1/d1/metrics", payload, max_bytes=1 << 20)
    assert isinstance(res, Rejected), res
    assert res.reason == reason, res.detail


def test_validator_failure_is_internal_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgefleet.server.telemetry.validate as v

    def boom(*_a: object, **_k: object) -> object:
        raise RecursionError("boom")

    monkeypatch.setattr(v, "parse_topic", boom)
    res = validate_message("edgefleet/v1/d1/metrics", env())
    assert isinstance(res, Rejected) and res.reason == "internal"


def test_sample_counts_are_validated_and_carry_no_contents() -> None:
    import json

    from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message

    def msg(samples: object) -> bytes:
        return json.dumps({"v": 1, "device": "pi-1", "boot": "ab12cd34", "seq": 1, "ts": 1.0,
                           "kind": "metrics", "body": {"samples": samples}}).encode()

    ok = validate_message("edgefleet/v1/pi-1/metrics", msg(
        {"total": 5, "bytes": 1280, "by_source": {"api": 2, "serial": 3},
         "by_class": {"0": 4, "7": 1}, "refused": {"unknown_class": 2}}))
    assert isinstance(ok, Accepted) and ok.metrics is not None
    assert ok.metrics.samples is not None and ok.metrics.samples.by_source["serial"] == 3
    for bad in ({"total": 1, "by_source": {"usb": 1}},            # unknown source
                {"total": 1, "by_class": {"cat": 1}},             # class names, not indices
                {"total": 1, "x": [[0.1, 0.2]]},                   # contents: no such field
                {"total": -1}):
        got = validate_message("edgefleet/v1/pi-1/metrics", msg(bad))
        assert isinstance(got, Rejected) and got.reason == "invalid", bad
