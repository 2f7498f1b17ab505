"""Wire format of model updates (version 1): topics, the assignment, state and events.

The server publishes retained assignments; the device answers with a retained state and
with events. Both ends use this module, so the topics, the assignment's validation and the
TUF target naming (``<model>/<version>.tar``, what the registry signs and the device
fetches) are written once. Documented in docs/updates.md.

Versioning follows the topic root (``edgefleet/v1/update/...``). v1 assignments carry no
``v`` field, so the bytes on the wire stay those of every deployed server; a decoder
accepts a missing ``v`` or ``"v": 1`` and refuses any other, so a v2 server cannot be
misread by a v1 device.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from edgefleet.device.core.errors import UpdateRejected

__all__ = [
    "ASSIGN_ROOT",
    "EVENT_FILTER",
    "FLEET_TOPIC",
    "MAX_ASSIGNMENT_BYTES",
    "PROTOCOL_VERSION",
    "STATE_FILTER",
    "Assignment",
    "decode_assignment",
    "decode_report",
    "device_of",
    "device_topic",
    "encode_event",
    "encode_state",
    "event_topic",
    "group_topic",
    "state_topic",
    "target_path",
]

PROTOCOL_VERSION: Final = 1
_ROOT = f"edgefleet/v{PROTOCOL_VERSION}/update"
ASSIGN_ROOT = f"{_ROOT}/assign"
FLEET_TOPIC = f"{ASSIGN_ROOT}/fleet"
#: What a server subscribes to for every device's retained state and its events.
STATE_FILTER = f"{_ROOT}/state/+"
EVENT_FILTER = f"{_ROOT}/event/+"
#: Largest assignment a device reads; checked before any parsing.
MAX_ASSIGNMENT_BYTES = 4096
#: Model names and versions as the package manifest allows them (a name is a path part).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")


def device_topic(device: str) -> str:
    """Retained assignment of one device."""
    return f"{ASSIGN_ROOT}/device/{device}"


def group_topic(group: str) -> str:
    """Retained assignment of a group."""
    return f"{ASSIGN_ROOT}/group/{group}"


def state_topic(device: str) -> str:
    """Retained update state of a device."""
    return f"{_ROOT}/state/{device}"


def event_topic(device: str) -> str:
    """Update events of a device."""
    return f"{_ROOT}/event/{device}"


def device_of(topic: str) -> tuple[str, str] | None:
    """``("state" | "event", device)`` of a state or event topic, else None."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != _ROOT or parts[3] not in ("state", "event"):
        return None
    return parts[3], parts[4]


def target_path(model: str, version: str) -> str:
    """The TUF target path of a model version: what the registry signs, the device fetches."""
    return f"{model}/{version}.tar"


def _bad(message: str) -> UpdateRejected:
    return UpdateRejected(message, reason="bad_assignment")


@dataclass(frozen=True)
class Assignment:
    """Which model version a device should run (or shadow)."""

    model: str
    version: str
    shadow: bool = False
    rollout: str | None = None

    def __post_init__(self) -> None:
        # Both ends construct through here: the server cannot send what a device refuses.
        if not isinstance(self.model, str) or not _NAME.match(self.model):
            raise _bad(f"bad model name {self.model!r}")
        if not isinstance(self.version, str) or not _VERSION.match(self.version):
            raise _bad(f"bad version {self.version!r}")

    @property
    def target(self) -> str:
        """The TUF target path."""
        return target_path(self.model, self.version)

    @classmethod
    def from_dict(cls, d: Any) -> Assignment:
        """Validate an assignment message (untrusted input: names are checked, not trusted)."""
        if not isinstance(d, dict):
            raise _bad("assignment is not a JSON object")
        v = d.get("v", PROTOCOL_VERSION)
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise _bad(f"unknown assignment version {v!r}")
        model: Any = d.get("model")  # checked in __post_init__, as any construction is
        version: Any = d.get("version")
        rollout = d.get("rollout")
        return cls(model, version, bool(d.get("shadow", False)),
                   str(rollout)[:64] if rollout is not None else None)

    def encode(self) -> bytes:
        """The retained message's payload."""
        return json.dumps({"model": self.model, "version": self.version,
                           "rollout": self.rollout, "shadow": self.shadow}).encode()


def decode_assignment(payload: bytes) -> Assignment | None:
    """Parse a retained assignment; None for the empty message that clears one.

    Raises :class:`UpdateRejected` (``reason`` ``too_large`` or ``bad_assignment``).
    """
    if not payload:
        return None
    if len(payload) > MAX_ASSIGNMENT_BYTES:
        raise UpdateRejected(f"assignment of {len(payload)} bytes exceeds "
                             f"{MAX_ASSIGNMENT_BYTES}", reason="too_large")
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError; deep nesting
        raise _bad(f"assignment is not JSON: {exc}") from None
    return Assignment.from_dict(data)


def encode_state(state: dict[str, Any]) -> bytes:
    """A device's retained update state (see docs/updates.md for its fields)."""
    return json.dumps(state).encode()


def encode_event(device: str, kind: str, **data: Any) -> bytes:
    """One update event: ``activated``, ``rejected``, ``rolled_back``, ..."""
    return json.dumps({"device": device, "event": kind, "ts": time.time(), **data}).encode()


def decode_report(payload: bytes) -> dict[str, Any] | None:
    """A state or event as the server reads it: a JSON object, or None (ignored).

    Lenient on purpose: fields are read one by one where they are used, so a device of a
    newer minor release (more fields) or a partial state is still understood.
    """
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None
