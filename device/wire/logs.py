"""Wire format of remote device logs (version 1): topics, request and response, limits.

The operator (broker role ``operator``) publishes a request on the device's own request
topic; the device answers on its own response topic with the request's ``id`` in every
chunk, so a client ignores chunks for other ids (two operators may ask the same device at
once). Only the device's outbound connection is needed. The broker ACL binds the request
topic to the operator role (write) and the device (read), the response topic to the device
(write) and the operator (read): no other device can ask for or read another's logs.

Requests: ``fetch`` (recent lines, then a ``final`` chunk), ``follow`` (the same, then new
lines for a lease of at most :data:`MAX_LEASE_S` seconds), ``renew`` (extend a follow's
lease), ``stop`` (end it). A vanished operator costs the device at most one lease.
Both ends parse with the functions here; docs/operations.md "Device logs" describes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.guarded_json import JsonLimits, JsonRejected, loads_guarded

__all__ = [
    "LEVELS",
    "MAX_LEASE_S",
    "MAX_LINES",
    "MAX_LINE_CHARS",
    "MAX_REQUEST_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_SINCE_S",
    "PROTOCOL_VERSION",
    "REQUEST_PREFIX",
    "RESPONSE_PREFIX",
    "LogLine",
    "LogProtocolError",
    "LogRequest",
    "LogResponse",
    "decode_request",
    "decode_response",
    "device_of_request",
    "encode_chunks",
    "request_topic",
    "response_topic",
]

PROTOCOL_VERSION: Final = 1
REQUEST_PREFIX: Final = f"edgefleet/v{PROTOCOL_VERSION}/logs/request/"
RESPONSE_PREFIX: Final = f"edgefleet/v{PROTOCOL_VERSION}/logs/response/"
#: Largest request a device reads (checked before parsing): a request is a few fields.
MAX_REQUEST_BYTES: Final = 1024
#: Largest response chunk a device sends and a client reads.
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: Most lines one request may ask for (the device's ring holds about this many).
MAX_LINES: Final = 2000
#: Most lines in one chunk, and characters of one line (longer ones are cut).
MAX_CHUNK_LINES: Final = 200
MAX_LINE_CHARS: Final = 2000
#: Longest follow lease, and how far back ``since_s`` may reach (a week).
MAX_LEASE_S: Final = 60.0
MAX_SINCE_S: Final = 7 * 24 * 3600.0
LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_REQUEST_LIMITS = JsonLimits(max_bytes=MAX_REQUEST_BYTES, max_depth=2, max_keys=16,
                             max_list=0, max_string=64)
_RESPONSE_LIMITS = JsonLimits(max_bytes=MAX_RESPONSE_BYTES, max_depth=4,
                              max_keys=16 + 4 * MAX_CHUNK_LINES, max_list=MAX_CHUNK_LINES,
                              max_string=4 * MAX_LINE_CHARS)
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Op = Literal["fetch", "follow", "renew", "stop"]
_OPS: Final = ("fetch", "follow", "renew", "stop")


class LogProtocolError(EdgefleetError):
    """A log request or response that does not follow the v1 format (``reason`` is stable:
    a guarded-reader code such as ``too_large``, or ``bad_request`` / ``bad_response``)."""

    exit_code = 65

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def request_topic(device: str) -> str:
    """Where the operator asks ``device`` for its logs."""
    return REQUEST_PREFIX + device


def response_topic(device: str) -> str:
    """Where ``device`` answers."""
    return RESPONSE_PREFIX + device


def device_of_request(topic: str) -> str | None:
    """The device whose request topic this is, else None."""
    if not topic.startswith(REQUEST_PREFIX):
        return None
    device = topic[len(REQUEST_PREFIX):]
    return device if device and not any(c in device for c in "/+#\0") else None


def _load(payload: bytes, limits: JsonLimits, what: str) -> Any:
    """``payload`` by the guarded reader (its size check comes first); a refusal keeps
    the reader's reason (``too_large``, ``too_deep``, ...)."""
    try:
        return loads_guarded(payload, limits)
    except JsonRejected as exc:
        raise LogProtocolError(f"{what} is not JSON within limits: {exc}",
                               reason=exc.reason) from None


def _bad(message: str) -> LogProtocolError:
    return LogProtocolError(message, reason="bad_request")


@dataclass(frozen=True)
class LogRequest:
    """What the operator asks for; constructed (and so checked) the same on both ends."""

    id: str
    op: Op = "fetch"
    lines: int = 200
    since_s: float | None = None
    level: str = "DEBUG"
    lease_s: float = 20.0

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not _ID.fullmatch(self.id):
            raise _bad("id must be 1-64 letters, digits, '_' or '-'")
        if self.op not in _OPS:
            raise _bad(f"unknown op {str(self.op)[:16]!r}")
        if type(self.lines) is not int or not 1 <= self.lines <= MAX_LINES:
            raise _bad(f"lines must be an integer in 1..{MAX_LINES}")
        if self.since_s is not None and (
                type(self.since_s) not in (int, float) or not 0 < self.since_s <= MAX_SINCE_S):
            raise _bad(f"since_s must be in (0, {MAX_SINCE_S:.0f}]")
        if self.level not in LEVELS:
            raise _bad(f"level must be one of {', '.join(LEVELS)}")
        if type(self.lease_s) not in (int, float) or not 1 <= self.lease_s <= MAX_LEASE_S:
            raise _bad(f"lease_s must be in [1, {MAX_LEASE_S:.0f}]")

    def encode(self) -> bytes:
        """The request's payload."""
        return json.dumps({"v": PROTOCOL_VERSION, "id": self.id, "op": self.op,
                           "lines": self.lines, "since_s": self.since_s,
                           "level": self.level, "lease_s": self.lease_s}).encode()


def decode_request(payload: bytes) -> LogRequest:
    """Parse an untrusted request; raises :class:`LogProtocolError` (``too_large``,
    a guarded-reader reason, or ``bad_request``)."""
    d = _load(payload, _REQUEST_LIMITS, "request")
    if not isinstance(d, dict):
        raise _bad("request is not a JSON object")
    if d.get("v") != PROTOCOL_VERSION or type(d.get("v")) is not int:
        raise _bad(f"unknown request version {str(d.get('v'))[:16]!r}")
    unknown = set(d) - {"v", "id", "op", "lines", "since_s", "level", "lease_s"}
    if unknown:
        raise _bad(f"unknown field {sorted(unknown)[0][:32]!r}")
    request_id: Any = d.get("id")  # checked in __post_init__, as any construction is
    return LogRequest(id=request_id, op=d.get("op", "fetch"), lines=d.get("lines", 200),
                      since_s=d.get("since_s"), level=d.get("level", "DEBUG"),
                      lease_s=d.get("lease_s", 20.0))


@dataclass(frozen=True)
class LogLine:
    """One log record as it leaves the device (already redacted)."""

    ts: float
    level: str
    logger: str
    msg: str

    def as_dict(self) -> dict[str, Any]:
        """The line's JSON object."""
        return {"ts": self.ts, "level": self.level, "logger": self.logger, "msg": self.msg}


@dataclass(frozen=True)
class LogResponse:
    """One chunk of an answer: lines, or a refusal (``error`` is a stable reason)."""

    id: str
    device: str
    seq: int
    lines: list[LogLine] = field(default_factory=list)
    final: bool = False
    error: str | None = None
    message: str | None = None
    #: More lines matched than the request's ``lines`` (the oldest were left out).
    truncated: bool = False

    def encode(self) -> bytes:
        """The chunk's payload."""
        body: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id, "device": self.device,
                                "seq": self.seq, "final": self.final,
                                "lines": [ln.as_dict() for ln in self.lines]}
        if self.truncated:
            body["truncated"] = True
        if self.error is not None:
            body["error"] = self.error
            body["message"] = (self.message or "")[:200]
        return json.dumps(body).encode()


def encode_chunks(request_id: str, device: str, lines: list[LogLine], *, first_seq: int = 0,
                  final: bool = False, truncated: bool = False) -> list[LogResponse]:
    """Split ``lines`` into chunks of at most :data:`MAX_CHUNK_LINES` lines and
    :data:`MAX_RESPONSE_BYTES` bytes (each line already cut to :data:`MAX_LINE_CHARS`);
    ``final`` marks the last chunk. No lines and ``final``: one empty final chunk."""
    chunks: list[LogResponse] = []
    current: list[LogLine] = []
    size = 256  # the envelope
    for ln in lines:
        ln = LogLine(float(ln.ts), ln.level, ln.logger[:128], ln.msg[:MAX_LINE_CHARS])
        n = len(json.dumps(ln.as_dict()).encode()) + 2
        if current and (len(current) >= MAX_CHUNK_LINES or size + n > MAX_RESPONSE_BYTES):
            chunks.append(LogResponse(request_id, device, first_seq + len(chunks), current))
            current, size = [], 256
        current.append(ln)
        size += n
    if current or final:
        chunks.append(LogResponse(request_id, device, first_seq + len(chunks), current))
    if chunks and final:
        chunks[-1] = LogResponse(request_id, device, chunks[-1].seq, chunks[-1].lines,
                                 final=True, truncated=truncated)
    return chunks


def _str(d: dict[str, Any], key: str, limit: int) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise LogProtocolError(f"{key} is not a string", reason="bad_response")
    return v[:limit]


def decode_response(payload: bytes, device: str) -> LogResponse:
    """Parse an untrusted chunk from ``device``'s response topic; raises
    :class:`LogProtocolError` (``too_large``, a guarded-reader reason, ``bad_response``,
    ``device_mismatch``)."""
    d = _load(payload, _RESPONSE_LIMITS, "response")
    if not isinstance(d, dict) or d.get("v") != PROTOCOL_VERSION:
        raise LogProtocolError("not a v1 log response object", reason="bad_response")
    if d.get("device") != device:
        raise LogProtocolError("response names another device", reason="device_mismatch")
    seq, raw_lines = d.get("seq"), d.get("lines", [])
    if type(seq) is not int or seq < 0 or not isinstance(raw_lines, list):
        raise LogProtocolError("bad seq or lines", reason="bad_response")
    lines = []
    for item in raw_lines:
        if not isinstance(item, dict) or type(item.get("ts")) not in (int, float):
            raise LogProtocolError("a line is not an object with a ts", reason="bad_response")
        level = _str(item, "level", 16)
        if level not in LEVELS:
            raise LogProtocolError(f"unknown level {level!r}", reason="bad_response")
        lines.append(LogLine(float(item["ts"]), level, _str(item, "logger", 128),
                             _str(item, "msg", MAX_LINE_CHARS)))
    error = d.get("error")
    return LogResponse(_str(d, "id", 64), device, seq, lines, final=d.get("final") is True,
                       error=str(error)[:64] if error is not None else None,
                       message=str(d.get("message", ""))[:200] if error is not None else None,
                       truncated=d.get("truncated") is True)
