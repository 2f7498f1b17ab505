"""Check every telemetry message before it reaches the store; name why one is refused.

Reasons (counted in the store's ``rejects`` table and the metrics registry as
``ingest_rejected_<reason>``):

- ``bad_topic``: not ``edgefleet/v1/<device>/{metrics,event,status}``
- ``oversized``: above :data:`MAX_PAYLOAD_BYTES` (checked before parsing)
- ``malformed``: not UTF-8 JSON, or not a JSON object
- ``unknown_schema``: a ``v`` this ingest does not know
- ``invalid``: the envelope or its body does not match the schema
- ``device_mismatch``: the payload names another device than the topic. The ingest
  cannot see who published (MQTT does not tell subscribers); the broker ACL is what stops
  a device from publishing under another device's topic, this catches the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edgefleet.device.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Envelope,
    MetricsBody,
    Status,
    parse_topic,
)

__all__ = ["REASONS", "Accepted", "Rejected", "validate_message"]

REASONS = ("bad_topic", "oversized", "malformed", "unknown_schema", "invalid",
           "device_mismatch")


@dataclass(frozen=True)
class Accepted:
    """A message that passed every check."""

    device: str
    kind: str
    envelope: Envelope | None = None
    status: Status | None = None
    metrics: MetricsBody | None = None
    text: str = ""


@dataclass(frozen=True)
class Rejected:
    """A message refused, with the reason and a short detail for the log."""

    reason: str
    detail: str


def validate_message(topic: str, payload: bytes,
                     max_bytes: int = MAX_PAYLOAD_BYTES) -> Accepted | Rejected:
    """Parse and check one message; never raises."""
    where = parse_topic(topic)
    if where is None:
        return Rejected("bad_topic", topic[:200])
    device, kind = where
    if len(payload) > max_bytes:
        return Rejected("oversized", f"{len(payload)} bytes")
    try:
        text = payload.decode("utf-8")
        raw: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        return Rejected("malformed", str(exc)[:200] or type(exc).__name__)
    if not isinstance(raw, dict):
        return Rejected("malformed", f"a JSON {type(raw).__name__}, not an object")
    if raw.get("v") != SCHEMA_VERSION:
        return Rejected("unknown_schema", f"v={raw.get('v')!r}"[:200])
    if raw.get("device") != device:
        return Rejected("device_mismatch", f"payload device {raw.get('device')!r} on {topic}"
                        [:200])
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
