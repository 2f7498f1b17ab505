"""Check every telemetry message before it reaches the store; name why one is refused.

Reasons (counted in the store's ``rejects`` table and the metrics registry as
``ingest_rejected_<reason>``):

- ``bad_topic``: not ``edgefleet/v1/<device>/{metrics,event,status}``
- ``oversized``: above :data:`MAX_PAYLOAD_BYTES` (checked before parsing)
- ``malformed``: not UTF-8 JSON, or not a JSON object
- ``unknown_schema``: a ``v`` this ingest does not know
- ``invalid``: the envelope or its body does not match the schema
- ``device_mismatch``: the payload names another device than the topic. The device id
  always comes from the topic, which the broker ACL binds to the authenticated user name
  (``pattern write edgefleet/v1/%u/...``); a payload naming anyone else is refused.
- the guarded JSON reader's limits (:mod:`edgefleet.device.core.guarded_json`), checked
  before or while parsing: ``too_deep``, ``too_many_keys``, ``list_too_long``,
  ``string_too_long``, ``number_too_large``, ``non_finite`` (NaN/Infinity anywhere);
  ``bad_utf8`` and broken JSON are ``malformed``, too many bytes ``oversized``
- ``clock_skew``: a timestamp further ahead of the receive time than ``max_future_s``
  (or, when set, older than ``max_age_s``)
- ``internal``: the validator itself failed (a bug); the message is still quarantined

A metrics report whose bytes provably keep the guarded reader's limits
(:func:`~edgefleet.device.core.guarded_json.within_limits_unparsed`) is validated in one
pydantic call on its bytes (:class:`MetricsEnvelope`); anything else, or anything that
call refuses, takes the full path above, which names the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from pydantic import ValidationError

from edgefleet.device.core.guarded_json import (
    JsonLimits,
    JsonRejected,
    check_timestamp,
    loads_guarded,
    within_limits_unparsed,
)
from edgefleet.device.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Envelope,
    MetricsBody,
    MetricsEnvelope,
    Status,
    parse_topic,
)

__all__ = ["LIMITS", "REASONS", "Accepted", "Rejected", "validate_message"]

REASONS = ("bad_topic", "oversized", "malformed", "unknown_schema", "invalid",
           "device_mismatch", "too_deep", "too_many_keys", "list_too_long",
           "string_too_long", "number_too_large", "non_finite", "clock_skew", "internal")

#: What a telemetry message may hold: a metrics body is four levels deep; histograms
#: have tens of buckets; counters and gauges a few hundred names.
LIMITS = JsonLimits(max_bytes=MAX_PAYLOAD_BYTES, max_depth=16, max_keys=2048, max_list=1024,
                    max_string=4096)
#: The guarded reader's codes that the ingest names differently.
_RENAMED = {"too_large": "oversized", "bad_utf8": "malformed"}


@lru_cache(maxsize=8)
def _limits(max_bytes: int) -> JsonLimits:
    """:data:`LIMITS` with the ingest's byte limit; one instance per limit, not one per
    message (both paths below read it)."""
    return replace(LIMITS, max_bytes=max_bytes)


@dataclass(frozen=True)
class Accepted:
    """A message that passed every check. A metrics report's typed body is ``metrics``
    (its envelope is a :class:`MetricsEnvelope` when it took the fast path)."""

    device: str
    kind: str
    envelope: Envelope | MetricsEnvelope | None = None
    status: Status | None = None
    metrics: MetricsBody | None = None
    text: str = ""


@dataclass(frozen=True)
class Rejected:
    """A message refused, with the reason and a short detail for the log."""

    reason: str
    detail: str


def validate_message(topic: str, payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES, *,
                     received: float | None = None, max_future_s: float = 300.0,
                     max_age_s: float | None = None) -> Accepted | Rejected:
    """Parse and check one message on its own; never raises (a failure of the checks
    themselves is ``internal``)."""
    try:
        return _validate(topic, payload, max_bytes, time.time() if received is None
                         else received, max_future_s, max_age_s)
    except Exception as exc:  # a bug here must not stop the ingest: quarantine the message
        return Rejected("internal", f"{type(exc).__name__}: {exc}"[:200])


def _validate(topic: str, payload: bytes, max_bytes: int, received: float,
              max_future_s: float, max_age_s: float | None) -> Accepted | Rejected:
    where = parse_topic(topic)
    if where is None:
        return Rejected("bad_topic", topic[:200])
    device, kind = where
    if len(payload) > max_bytes:
        return Rejected("oversized", f"{len(payload)} bytes")
    if kind == "metrics":
        fast = _fast_metrics(device, payload, max_bytes, received, max_future_s, max_age_s)
        if fast is not None:
            return fast
    try:
        raw: Any = loads_guarded(payload, _limits(max_bytes))
    except JsonRejected as exc:
        return Rejected(_RENAMED.get(exc.reason, exc.reason), str(exc)[:200])
    text = payload.decode("utf-8")
    if not isinstance(raw, dict):
        return Rejected("malformed", f"a JSON {type(raw).__name__}, not an object")
    if raw.get("v") != SCHEMA_VERSION:
        return Rejected("unknown_schema", f"v={raw.get('v')!r}"[:200])
    if raw.get("device") != device:
        return Rejected("device_mismatch", f"payload device {raw.get('device')!r} on {topic}"
                        [:200])
    ts = raw.get("ts")
    if isinstance(ts, int | float) and not isinstance(ts, bool):  # else the schema says no
        try:
            check_timestamp(ts, received, max_future_s=max_future_s, max_age_s=max_age_s)
        except JsonRejected as exc:
            return Rejected(exc.reason, str(exc)[:200])
    try:
        if kind == "status":
            return Accepted(device, kind, status=Status.model_validate(raw), text=text)
        env = Envelope.model_validate(raw)
        if env.kind != kind:
            return Rejected("invalid", f"kind {env.kind!r} on a {kind} topic")
        body = MetricsBody.model_validate(env.body) if kind == "metrics" else None
    except ValidationError as exc:
        err = exc.errors()[0]
        where_ = ".".join(str(p) for p in err["loc"])
        return Rejected("invalid", f"{where_}: {err['msg']}"[:200])
    return Accepted(device, kind, envelope=env, metrics=body, text=text)


def _fast_metrics(device: str, payload: bytes, max_bytes: int, received: float,
                  max_future_s: float, max_age_s: float | None) -> Accepted | Rejected | None:
    """A well-formed report in one pydantic call on its bytes: the guarded reader's
    limits proven from the bytes first (:func:`within_limits_unparsed`), then the
    envelope and body models at once. None when anything is off: the full path then
    decides and names the reason, so this path accepts only what that one accepts."""
    if not within_limits_unparsed(payload, _limits(max_bytes)):
        return None
    try:
        m = MetricsEnvelope.model_validate_json(payload)
    except ValidationError:
        return None
    if m.device != device:
        return None
    try:
        check_timestamp(m.ts, received, max_future_s=max_future_s, max_age_s=max_age_s)
    except JsonRejected as exc:
        return Rejected(exc.reason, str(exc)[:200])
    return Accepted(device, "metrics", envelope=m, metrics=m.body,
                    text=payload.decode("utf-8"))
