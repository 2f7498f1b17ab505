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


def _metrics_corpus() -> list[bytes]:
    """Metrics reports, well-formed and hostile, for the fast path to agree on."""
    ok = {"inferences": 30, "local": 30, "drift": {"input_psi": 0.02, "window": 500},
          "model": {"name": "digits", "version": "1.0.0"}, "gauges": {"t": 48.3},
          "counters": {"c": 1}, "custom": {"deep": {"er": [1, 2, {"x": "3e123"}]}}}
    base = json.loads(env(body=ok))
    out = [json.dumps(base).encode(), json.dumps(base, separators=(",", ":")).encode()]
    for body in ({"gauges": {"x": 1e308}}, {"counters": {"x": 10**25}}, {"inferences": -1},
                 {"inferences": 2**70}, {"inferences": 3.5}, {"inferences": "7"},
                 {"inferences": True}, {"model": {"name": 5}}, {"x": "\ud800"},
                 {"x": "A" * 5000}, {"counters": {f"c{i}": i for i in range(3000)}},
                 {"x": list(range(2000))}, {"a": json.loads("[" * 20 + "]" * 20)},
                 {"samples": {"total": 1, "by_source": {"other": 1}}}):
        out.append(json.dumps({**base, "body": body}).encode())
    for over in ({"ts": 1e12}, {"ts": -1}, {"ts": True}, {"device": "d2"}, {"v": 2},
                 {"v": 1.0}, {"seq": 0}, {"boot": "E0E0E0E0"}, {"kind": "event"},
                 {"extra": 1}, {"ts": "1.0"}):
        out.append(json.dumps({**base, **over}).encode())
    first = out[0]
    out += [first.replace(b"1e+308", b"1e999"), first.replace(b'"window": 500', b'"w": NaN'),
            first.replace(b"0.02", b"Infinity"), first.replace(b"500", b"5e400"),
            first + b" x", first[:-1], first.replace(b'"d1"', b'"d1", "device": "d2"')]
    return out


@pytest.mark.parametrize("payload", _metrics_corpus())
def test_the_fast_path_decides_as_the_full_path(payload: bytes,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A metrics report validated from its bytes in one pydantic call is accepted or
    refused exactly as the guarded reader and the two models would (same reason)."""
    import edgefleet.server.telemetry.validate as v

    fast = validate_message("edgefleet/v1/d1/metrics", payload, max_bytes=1 << 20,
                            received=10.0)
    monkeypatch.setattr(v, "_fast_metrics", lambda *_a: None)
    full = validate_message("edgefleet/v1/d1/metrics", payload, max_bytes=1 << 20,
                            received=10.0)
    assert type(fast) is type(full)
    if isinstance(full, Rejected):
        assert isinstance(fast, Rejected) and fast.reason == full.reason, (fast, full)
    else:
        assert isinstance(fast, Accepted) and fast.metrics is not None
        assert full.metrics is not None and full.envelope is not None
        assert fast.metrics.model_dump() == full.metrics.model_dump()
        assert fast.text == full.text and fast.envelope is not None
        assert (fast.envelope.boot, fast.envelope.seq, fast.envelope.ts) == (
            full.envelope.boot, full.envelope.seq, full.envelope.ts)


def test_an_ordinary_report_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgefleet.server.telemetry.validate as v

    def no_full(*_a: object, **_k: object) -> object:
        raise AssertionError("the guarded reader ran")

    monkeypatch.setattr(v, "loads_guarded", no_full)
    res = validate_message("edgefleet/v1/d1/metrics", _metrics_corpus()[0], received=10.0)
    assert isinstance(res, Accepted) and res.metrics is not None
    assert res.metrics.inferences == 30
