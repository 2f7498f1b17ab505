"""The v1 scoring wire format: round trips, refusals, and only the documented error escapes."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.device.wire.scoring import (
    MAX_REQUEST_BYTES,
    ScoreProtocolError,
    ScoreReply,
    ScoreRequest,
    decode_reply,
    decode_request,
    encode,
    request_topic,
    requester_of,
    response_topic,
    shared_request_filter,
    valid_response_topic,
)


def _req(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"v": 1, "task": "digits", "model": "m@1", "mode": "features",
                               "features": [0.5, 1.0], "deadline_ms": 200}
    return {**base, **over}


def test_round_trips() -> None:
    req = ScoreRequest.model_validate(_req(mode="raw", raw=[1.0, -2.5]))
    assert decode_request(encode(req)) == req
    reply = ScoreReply(ok=True, label=2, label_name="2", confidence=0.9,
                       probabilities=[0.05, 0.05, 0.9], model="c@1", scorer="s", batch=3)
    assert decode_reply(encode(reply), 3) == reply
    assert "raw" not in json.loads(encode(ScoreRequest.model_validate(_req())))


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (json.dumps(_req(v=2)).encode(), "bad_request"),
    (json.dumps(_req(features=[])).encode(), "bad_request"),
    (json.dumps(_req(extra=1)).encode(), "bad_request"),
    (json.dumps(_req(raw=[1.0])).encode(), "bad_request"),  # raw in features mode
    (json.dumps(_req(deadline_ms=0)).encode(), "bad_request"),
    (b'{"v":1,"task":"d","model":"m","mode":"raw","features":[1],"raw":[Infinity],'
     b'"deadline_ms":1}', "bad_request"),
    (b" " * (MAX_REQUEST_BYTES + 1), "too_large"),
])
def test_bad_requests_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ScoreProtocolError) as info:
        decode_request(payload)
    assert info.value.reason == reason


@pytest.mark.parametrize("payload", [
    b'{"v":1,"ok":true}',                                      # no label
    b'{"v":1,"ok":true,"label":5,"confidence":0.5}',           # label outside 0..4
    b'{"v":1,"ok":true,"label":1,"confidence":1.5}',           # not a probability
    b'{"v":1,"ok":false}',                                     # refusal without a code
    b'{"v":1,"ok":false,"error":"made_up"}',                   # unknown code
    b"[]",
])
def test_bad_replies_are_refused(payload: bytes) -> None:
    with pytest.raises(ScoreProtocolError) as info:
        decode_reply(payload, n_classes=5)
    assert info.value.reason in {"bad_reply", "bad_json"}


def test_topics_and_response_topic_check() -> None:
    assert request_topic("d1") == "edgefleet/v1/score/request/d1"
    assert shared_request_filter("g") == "$share/g/edgefleet/v1/score/request/+"
    assert valid_response_topic(response_topic("d1"))
    for bad in (None, "", "edgefleet/v1/score/response/", "devices/d1/cmd",
                "edgefleet/v1/score/response/#", "edgefleet/v1/score/response/+/x"):
        assert not valid_response_topic(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512) | st.text(max_size=200).map(str.encode))
def test_decoders_raise_only_the_protocol_error(payload: bytes) -> None:
    for decode in (decode_request, lambda p: decode_reply(p, 10)):
        with contextlib.suppress(ScoreProtocolError):
            decode(payload)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.sampled_from(["v", "task", "model", "mode",
                                                       "features", "raw", "ok", "label",
                                                       "confidence", "error"]), kids,
                                      max_size=6),
                    max_leaves=12))
def test_json_shaped_garbage_raises_only_the_protocol_error(value: object) -> None:
    payload = json.dumps(value).encode()
    for decode in (decode_request, lambda p: decode_reply(p, 10)):
        with contextlib.suppress(ScoreProtocolError):
            decode(payload)


def test_hostile_payloads_are_protocol_errors_with_a_cause() -> None:
    deep = b"[" * 2000 + b"]" * 2000  # a naive json.loads raises RecursionError here
    for payload, cause in ((deep, "too_deep"), (b'{"v":1,"ok":true,"confidence":NaN}',
                                                "non_finite"), (b"\xff", "bad_utf8")):
        with pytest.raises(ScoreProtocolError) as info:
            decode_reply(payload, n_classes=3)
        assert info.value.cause == cause
        with pytest.raises(ScoreProtocolError):
            decode_request(payload)


def test_reply_topic_must_be_the_requesters_own() -> None:
    assert requester_of(request_topic("pi-1")) == "pi-1"
    assert requester_of("edgefleet/v1/score/request/a/b") is None
    assert valid_response_topic(response_topic("pi-1"), "pi-1")
    assert not valid_response_topic(response_topic("pi-2"), "pi-1")
    assert not valid_response_topic(response_topic("pi-1") + "/x", "pi-1")
