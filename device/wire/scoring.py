"""Wire format of cloud scoring (version 1): topics and JSON payloads, for both ends.

A device publishes a request to its own request topic with the MQTT 5 *Response Topic*
and *Correlation Data* properties set; a scorer (one of a shared-subscription group)
publishes the reply to that response topic with the same correlation data. Only the
device's outbound connection is needed, so a device behind NAT can be scored.
Documented in docs/fallback.md; both ends parse with the functions here, so a change to
the format is a change in one place.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import EdgefleetError

__all__ = [
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "REQUEST_PREFIX",
    "RESPONSE_PREFIX",
    "ScoreProtocolError",
    "ScoreReply",
    "ScoreRequest",
    "decode_reply",
    "decode_request",
    "encode",
    "request_topic",
    "response_topic",
    "scorer_status_topic",
    "shared_request_filter",
    "valid_response_topic",
]

PROTOCOL_VERSION = 1
REQUEST_PREFIX = "edgefleet/v1/score/request/"
RESPONSE_PREFIX = "edgefleet/v1/score/response/"
#: Largest request a scorer reads; checked before any parsing.
MAX_REQUEST_BYTES = 256 * 1024
MAX_REPLY_BYTES = 64 * 1024
#: Error codes a scorer may answer with (``error`` of a reply with ``ok: false``).
ErrorCode = Literal["bad_json", "bad_request", "wrong_task", "bad_input", "too_large",
                    "overloaded", "internal"]


class ScoreProtocolError(EdgefleetError):
    """A scoring request or reply that does not follow the v1 format."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def request_topic(device_id: str) -> str:
    """Where ``device_id`` publishes its scoring requests."""
    return REQUEST_PREFIX + device_id


def response_topic(device_id: str) -> str:
    """Where ``device_id`` receives replies (sent as the request's Response Topic)."""
    return RESPONSE_PREFIX + device_id


def shared_request_filter(group: str) -> str:
    """The shared subscription that splits all devices' requests over a scorer group."""
    return f"$share/{group}/{REQUEST_PREFIX}+"


def scorer_status_topic(scorer_id: str) -> str:
    """Retained ``online``/``offline`` status of one scorer process (its will)."""
    return f"edgefleet/v1/scorer/{scorer_id}/status"


def valid_response_topic(topic: str | None) -> bool:
    """A scorer only replies under the response prefix: it must not be an open relay."""
    if not topic or not topic.startswith(RESPONSE_PREFIX) or topic == RESPONSE_PREFIX:
        return False
    return not any(c in topic for c in "+#\0")


def _finite(values: list[float]) -> list[float]:
    if not all(math.isfinite(v) for v in values):
        raise ValueError("values must be finite")
    return values


class ScoreRequest(StrictModel):
    """What leaves the device: the model input, and the raw sample only in ``raw`` mode."""

    v: Literal[1] = 1
    task: str = Field(max_length=64)
    #: The device model that escalated, ``name@version`` (for the scorer's logs).
    model: str = Field(max_length=128)
    mode: Literal["features", "raw"]
    features: list[float] = Field(min_length=1, max_length=16384)
    raw: list[float] | None = Field(default=None, max_length=65536)
    #: The device's deadline; a scorer skips a request that waited longer than this.
    deadline_ms: float = Field(gt=0, le=60_000)

    @field_validator("features", "raw")
    @classmethod
    def _all_finite(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else _finite(v)


class ScoreReply(StrictModel):
    """The scorer's answer (``ok``) or its refusal (``error`` and ``message``)."""

    v: Literal[1] = 1
    ok: bool
    label: int | None = Field(default=None, ge=0)
    label_name: str | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    probabilities: list[float] | None = None
    #: The cloud model that answered, ``name@version``.
    model: str | None = None
    scorer: str | None = None
    #: How many requests the scorer ran in the same micro-batch.
    batch: int | None = Field(default=None, ge=1)
    error: ErrorCode | None = None
    message: str | None = Field(default=None, max_length=500)


def encode(msg: ScoreRequest | ScoreReply) -> bytes:
    """Compact UTF-8 JSON without the fields left unset."""
    return json.dumps(msg.model_dump(exclude_none=True), separators=(",", ":")).encode()


def _load(payload: bytes, limit: int) -> Any:
    if len(payload) > limit:
        raise ScoreProtocolError(f"payload of {len(payload)} bytes exceeds {limit}",
                                 reason="too_large")
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError; deep nesting
        raise ScoreProtocolError(f"payload is not JSON: {exc}", reason="bad_json") from None


def _why(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"


def decode_request(payload: bytes) -> ScoreRequest:
    """Parse a request; raises :class:`ScoreProtocolError` with a ``reason`` code."""
    data = _load(payload, MAX_REQUEST_BYTES)
    try:
        req = ScoreRequest.model_validate(data)
    except ValidationError as exc:
        raise ScoreProtocolError(f"bad request: {_why(exc)}", reason="bad_request") from None
    if req.raw is not None and req.mode != "raw":
        raise ScoreProtocolError("bad request: raw data sent in features mode",
                                 reason="bad_request")
    return req


def decode_reply(payload: bytes, n_classes: int) -> ScoreReply:
    """Parse a reply for a model with ``n_classes`` labels; a bad one raises, never guesses."""
    data = _load(payload, MAX_REPLY_BYTES)
    try:
        reply = ScoreReply.model_validate(data)
    except ValidationError as exc:
        raise ScoreProtocolError(f"bad reply: {_why(exc)}", reason="bad_reply") from None
    if reply.ok and (reply.label is None or reply.label >= n_classes
                     or reply.confidence is None):
        raise ScoreProtocolError(f"bad reply: label {reply.label} for {n_classes} classes",
                                 reason="bad_reply")
    if not reply.ok and reply.error is None:
        raise ScoreProtocolError("bad reply: ok is false but no error code",
                                 reason="bad_reply")
    return reply

