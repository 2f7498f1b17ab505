"""The telemetry wire format (docs/telemetry.md): topics, envelopes and metric names.

Devices build payloads with these models and the ingest service validates with the same
ones, so the two sides cannot drift apart. The topic layout and the ``v`` field are both
versioned: a breaking change means ``edgefleet/v2/...`` and ``"v": 2``, and an ingest that
does not know a version rejects the message with the reason ``unknown_schema``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "DEVICE_ID_PATTERN",
    "HEADLINE",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "TOPIC_ROOT",
    "Envelope",
    "MetricsBody",
    "MetricsEnvelope",
    "SamplesBody",
    "Status",
    "encode",
    "parse_topic",
    "topic_for",
]

SCHEMA_VERSION: Final = 1
TOPIC_ROOT = f"edgefleet/v{SCHEMA_VERSION}"
#: Payloads above this are rejected by the ingest (and never produced by a device).
MAX_PAYLOAD_BYTES = 64 * 1024
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Kind = Literal["metrics", "event", "status"]

#: Names in the metrics registry that the headline fields of a report come from. The
#: runtime counts into these; everything else in the registry is reported as it is.
HEADLINE = {
    # Counted by edgefleet.device.runtime.predictor.Predictor and .fallback.HybridPredictor.
    "inferences": "inferences",
    "local": "fallback_local",
    "fallback": "fallback_cloud",
    "degraded": "fallback_degraded",
    "latency_ms": "inference_latency_ms",
    "confidence": "inference_confidence",
    "model_name": "model_name",
    "model_version": "model_version",
    "model_variant": "model_variant",
    "training_state": "training_state",
    "epsilon": "training_epsilon",
}


def topic_for(device: str, kind: Kind) -> str:
    """``edgefleet/v1/<device>/<kind>``."""
    return f"{TOPIC_ROOT}/{device}/{kind}"


def encode(message: Envelope | Status) -> bytes:
    """The payload bytes of a message: compact JSON, what every producer sends."""
    return json.dumps(message.model_dump(), separators=(",", ":"), default=str).encode()


def parse_topic(topic: str) -> tuple[str, str] | None:
    """``(device, kind)`` of a topic in our layout, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        return None
    if parts[3] not in ("metrics", "event", "status"):
        return None
    return parts[2], parts[3]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Header(_Strict):
    v: Literal[1]
    device: str = Field(pattern=DEVICE_ID_PATTERN)
    #: Random per agent start: (device, boot, seq) is unique even after a spool is lost.
    boot: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    seq: int = Field(ge=1, lt=2**63)
    ts: float = Field(ge=0)


class Envelope(_Header):
    """Every spooled message: who sent it, which boot, which sequence number, and a body."""

    kind: Literal["metrics", "event"]
    body: dict[str, Any]


class Status(_Strict):
    """The retained ``online`` message and the last-will ``offline`` message."""

    v: Literal[1]
    device: str = Field(pattern=DEVICE_ID_PATTERN)
    boot: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    state: Literal["online", "offline"]
    ts: float = Field(ge=0)


class HistogramBody(BaseModel):
    """A histogram snapshot (:meth:`edgefleet.device.core.metrics.Histogram.snapshot`)."""

    count: int = Field(ge=0)
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    bounds: list[float] = Field(default_factory=list)
    counts: list[int] = Field(default_factory=list)
    sum: float = 0.0


class SamplesBody(_Strict):
    """The sample store in a report: counts per label source and class, never contents."""

    total: int = Field(ge=0)
    bytes: int = Field(default=0, ge=0)
    by_source: dict[Literal["api", "serial", "scorer", "import"], int] = Field(
        default_factory=dict)
    by_class: dict[Annotated[str, StringConstraints(pattern=r"^[0-9]{1,4}$")],
                   Annotated[int, Field(ge=0)]] = Field(default_factory=dict, max_length=1000)
    refused: dict[Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")],
                  Annotated[int, Field(ge=0)]] = Field(default_factory=dict, max_length=32)


class MetricsBody(BaseModel):
    """The body of a ``metrics`` message; the ingest reads the typed fields."""

    model_config = ConfigDict(extra="allow")

    inferences: int = Field(default=0, ge=0)
    local: int = Field(default=0, ge=0)
    fallback: int = Field(default=0, ge=0)
    degraded: int = Field(default=0, ge=0)
    latency_ms: HistogramBody | None = None
    confidence: HistogramBody | None = None
    drift: dict[str, float | int | None] | None = None
    model: dict[str, str | None] = Field(default_factory=dict)
    training: dict[str, str | float | None] = Field(default_factory=dict)
    system: dict[str, float | int | None] = Field(default_factory=dict)
    spool: dict[str, int] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)
    gauges: dict[str, float | str | None] = Field(default_factory=dict)
    samples: SamplesBody | None = None


class MetricsEnvelope(_Header):
    """An :class:`Envelope` of kind ``metrics`` with its body typed: the same checks in
    one model, so the ingest validates a report's bytes in one pydantic call."""

    kind: Literal["metrics"]
    body: MetricsBody
