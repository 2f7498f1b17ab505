"""Remote logs without a broker: the wire format, the ring, redaction, the rate limit and
the device's refusals of hostile requests (the e2e test runs them over a real broker)."""

from __future__ import annotations

import json
import logging

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.log_ring import REDACTED, LogRing, TokenBucket, redact
from edgefleet.device.telemetry.log_server import LogServer
from edgefleet.device.wire.logs import (
    MAX_CHUNK_LINES,
    MAX_LINE_CHARS,
    MAX_RESPONSE_BYTES,
    LogLine,
    LogProtocolError,
    LogRequest,
    LogResponse,
    decode_request,
    decode_response,
    encode_chunks,
    request_topic,
)

PEM = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n"
       "-----END PRIVATE KEY-----")
SECRETS = [
    ("connecting with password=hunter2hunter2 to broker", "hunter2hunter2"),
    ('config {"mqtt_password": "s3cr3t-value-x"}', "s3cr3t-value-x"),
    ("Authorization: Bearer abcdef0123456789.token", "abcdef0123456789.token"),
    ("fetch https://user:pa55word99@registry.local/x", "pa55word99"),
    (f"loaded key {PEM} ok", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"),
    ("cut off " + PEM[:60], "MIIEvQIBADANBgkqh"),
    ("api_key: AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc123", "eyJzdWIiOiIxMjM0"),
    ("token=ghp_" + "a" * 36, "ghp_aaaa"),
]


# --- wire --------------------------------------------------------------------------------
def test_request_round_trip_and_limits() -> None:
    req = LogRequest(id="abc-1", op="follow", lines=50, since_s=600.0, level="INFO",
                     lease_s=10)
    assert decode_request(req.encode()) == req
    with pytest.raises(LogProtocolError) as e:
        decode_request(b"{" * 2000)
    assert e.value.reason == "too_large"
    for bad in (b"[]", b'{"v": 2, "id": "a"}', b'{"v": 1, "id": "a/b"}',
                b'{"v": 1, "id": "a", "lines": 1e9}', b'{"v": 1, "id": "a", "op": "rm"}',
                b'{"v": 1, "id": "a", "lease_s": 3600}', b'{"v": 1, "id": "a", "x": 1}',
                b'{"v": 1, "id": "a", "level": "LOUD"}', b'{"v": true, "id": "a"}',
                b'{"v": 1, "id": "a\\n"}'):
        with pytest.raises(LogProtocolError) as e:
            decode_request(bad)
        assert e.value.reason == "bad_request", bad
    for bad, reason in ((b'{"v": 1, "id": [[[1]]]}', "too_deep"), (b"\xff", "bad_utf8"),
                        (b"{nope", "malformed")):
        with pytest.raises(LogProtocolError) as e:
            decode_request(bad)
        assert e.value.reason == reason


def test_chunks_are_bounded_and_round_trip() -> None:
    lines = [LogLine(1.0 + i, "INFO", "x", "y" * 5000) for i in range(450)]
    chunks = encode_chunks("r1", "dev1", lines, final=True, truncated=True)
    assert all(len(c.encode()) <= MAX_RESPONSE_BYTES for c in chunks)
    assert all(len(c.lines) <= MAX_CHUNK_LINES for c in chunks)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    back = [decode_response(c.encode(), "dev1") for c in chunks]
    got = [ln for c in back for ln in c.lines]
    assert len(got) == 450 and all(len(ln.msg) == MAX_LINE_CHARS for ln in got)
    assert back[-1].truncated and back[-1].final
    assert encode_chunks("r1", "dev1", [], final=True)[0].final


def test_client_refuses_hostile_responses() -> None:
    ok = LogResponse("r1", "dev1", 0, [LogLine(1.0, "INFO", "a", "b")]).encode()
    assert decode_response(ok, "dev1").lines[0].msg == "b"
    cases = [
        (b" " * (MAX_RESPONSE_BYTES + 1), "too_large"),
        (ok, "device_mismatch"),  # read as dev2's answer
        (b'{"v": 1, "device": "dev2", "id": "r", "seq": 0, "lines": [{"ts": "x"}]}',
         "bad_response"),
        (b'{"v": 1, "device": "dev2", "id": "r", "seq": -1}', "bad_response"),
        (b'{"v": 1, "device": "dev2", "id": "r", "seq": 0, "lines": '
         b'[{"ts": 1, "level": "EVIL", "logger": "a", "msg": "b"}]}', "bad_response"),
        (b"[" * 100, "too_deep"),
        (b'{"v": 1, "device": "dev2", "id": 5, "seq": 0}', "bad_response"),
    ]
    for payload, reason in cases:
        with pytest.raises(LogProtocolError) as e:
            decode_response(payload, "dev2")
        assert e.value.reason == reason, payload[:80]


# --- redaction -------------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "secret"), SECRETS)
def test_redaction_removes_secrets(line: str, secret: str) -> None:
    out = redact(line)
    assert secret not in out and REDACTED in out


def test_redaction_keeps_ordinary_lines() -> None:
    for line in ("agent dev-1 started", "frame 12 not answered: bad CRC",
                 "model digits-mlp@1.2.0 activated (sha256 9f86d081884c7d65)"):
        assert redact(line) == line


# --- the ring --------------------------------------------------------------------------------
def _logger(ring: LogRing, name: str = "t.ring") -> logging.Logger:
    lg = logging.getLogger(name)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
    lg.handlers = [ring]
    return lg


def test_ring_is_bounded_by_records_and_bytes() -> None:
    ring = LogRing(max_records=100, max_bytes=1 << 20)
    lg = _logger(ring)
    for i in range(250):
        lg.info("line %d", i)
    assert len(ring) == 100
    lines, last, truncated = ring.select(limit=10)
    assert [ln.msg for ln in lines] == [f"line {i}" for i in range(240, 250)]
    assert last == 250 and truncated
    small = LogRing(max_records=10_000, max_bytes=20_000)
    lg = _logger(small, "t.small")
    for _ in range(100):
        lg.info("x" * 1000)
    assert 10 <= len(small) <= 20


def test_ring_filters_by_level_time_and_seq_and_redacts() -> None:
    ring = LogRing()
    lg = _logger(ring, "t.filter")
    lg.debug("noise")
    lg.warning("connect with password=abcdef123456")
    try:
        raise ValueError("boom")
    except ValueError:
        lg.exception("failed")
    lines, last, _ = ring.select(level="WARNING")
    assert [ln.level for ln in lines] == ["WARNING", "ERROR"]
    assert "abcdef123456" not in lines[0].msg and "ValueError: boom" in lines[1].msg
    assert ring.select(after_seq=last)[0] == []
    assert len(ring.select(since_s=3600)[0]) == 3
    lg.info("the broker password is lit3ral-pw-99 today")
    assert "lit3ral-pw-99" not in ring.select(secrets=["lit3ral-pw-99"])[0][-1].msg


def test_token_bucket() -> None:
    now = [0.0]
    b = TokenBucket(1.0, 3, clock=lambda: now[0])
    assert [b.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 1.0
    assert b.take() and not b.take()


# --- the device's server, driven without a broker -----------------------------------------------
class _Server:
    def __init__(self) -> None:
        self.now = 100.0
        self.metrics = Metrics()
        self.ring = LogRing()
        self.lg = _logger(self.ring, "t.server")
        self.srv = LogServer("dev1", self.ring, MqttConfig(), metrics=self.metrics,
                             secrets=lambda: ["the-mqtt-pw-123"], clock=lambda: self.now)

    def ask(self, payload: bytes, topic: str | None = None) -> list[LogResponse]:
        self.srv.handle(topic or request_topic("dev1"), payload)
        return self.sent()

    def sent(self) -> list[LogResponse]:
        out = [decode_response(p, "dev1") for p in self.srv._outbox]
        self.srv._outbox.clear()
        return out


def test_fetch_answers_with_redacted_lines() -> None:
    s = _Server()
    s.lg.info("hello")
    s.lg.info("pw is the-mqtt-pw-123")
    s.lg.debug("dbg")
    out = s.ask(LogRequest(id="r1", lines=10, level="INFO").encode())
    assert len(out) == 1 and out[0].final and out[0].id == "r1"
    assert [ln.msg for ln in out[0].lines] == ["hello", f"pw is {REDACTED}"]


def test_refusals_are_counted_and_answered_with_a_reason() -> None:
    s = _Server()
    assert s.ask(b"x" * 5000) == [] and s.metrics.counter("logs_request_refused_too_large")
    assert s.ask(b"{bad") == [] and s.metrics.counter("logs_request_refused_malformed")
    assert s.ask(b'{"v": 1, "id": "a", "op": "rm"}') == []
    assert s.metrics.counter("logs_request_refused_bad_request") == 1
    assert s.ask(LogRequest(id="r").encode(), topic=request_topic("dev2")) == []
    assert s.metrics.counter("logs_request_refused_foreign_topic") == 1
    replies = [s.ask(LogRequest(id=f"r{i}").encode()) for i in range(5)]
    assert [r[0].error for r in replies] == [None, None, None, "rate_limited", "rate_limited"]
    assert s.metrics.counter("logs_request_refused_rate_limited") == 2
    s.now += 10
    assert s.ask(LogRequest(id="x", op="renew").encode())[0].error == "unknown_follow"


def test_follow_streams_new_lines_within_its_lease() -> None:
    s = _Server()
    s.lg.info("old")
    first = s.ask(LogRequest(id="f1", op="follow", lease_s=5).encode())
    assert [ln.msg for ln in first[0].lines] == ["old"] and not first[-1].final
    s.lg.info("new one")
    s.srv.pump()
    assert [ln.msg for c in s.sent() for ln in c.lines] == ["new one"]
    s.now += 4
    s.ask(LogRequest(id="f1", op="renew", lease_s=5).encode())  # acknowledged, extended
    s.now += 4
    s.lg.info("after renewal")
    s.srv.pump()
    assert [ln.msg for c in s.sent() for ln in c.lines] == ["after renewal"]
    # Follows are capped; the vanished operator's lease runs out and costs nothing more.
    s.now += 2
    s.ask(LogRequest(id="f2", op="follow").encode())
    s.now += 2
    assert s.ask(LogRequest(id="f3", op="follow").encode())[0].error == "too_many_follows"
    s.now += 60
    s.srv.pump()
    ended = s.sent()
    assert sorted(c.id for c in ended) == ["f1", "f2"]
    assert all(c.final and c.error == "lease_expired" for c in ended)
    assert s.srv.follows == {}
    s.lg.info("nobody listens")
    s.srv.pump()
    assert s.sent() == []


def test_a_handler_failure_does_not_end_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _Server()

    def broken(*_a: object, **_k: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(s.ring, "select", broken)
    s.srv._inbox.append((request_topic("dev1"), LogRequest(id="r").encode()))
    s.srv.start()
    try:
        from tests.support.telemetry import wait_until

        assert wait_until(lambda: s.metrics.counter("logs_loop_errors") >= 1, 5)
        assert s.srv._thread is not None and s.srv._thread.is_alive()
    finally:
        s.srv.stop()
    assert json.loads(LogRequest(id="r").encode())["v"] == 1
