"""Wire format of model updates (version 1): topics, the assignment, state and events.

The server publishes retained assignments; the device answers with a retained state and
with events. Both ends use this module, so the topics, the assignment's validation and the
TUF target naming (``<model>/<version>.tar``, what the registry signs and the device
fetches) are written once. Documented in docs/updates.md.

Versioning follows the topic root (``edgefleet/v1/update/...``). v1 assignments carry no
``v`` field, so the bytes on the wire stay those of every deployed server; a decoder
accepts a missing ``v`` or ``"v": 1`` and refuses any other, so a v2 server cannot be
misread by a v1 device.

v2 assignments are signed by the fleet's director (Uptane's director repository: TUF says
what exists, the director says what *this* device should run). The signed part names the
device, a sequence number and an expiry, so a copy cannot be sent to another device,
replayed after a newer one, or held back forever; :class:`KeyLink` chains let a device
move from the director key it pinned at enrollment to a rotated one. A device that pinned
a director key refuses v1 (``unsigned_assignment``). Signatures are Ed25519 over
:func:`canonical_bytes` of the signed part (sorted keys, compact, ASCII).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefleet.device.core.errors import UpdateRejected
from edgefleet.device.core.guarded_json import JsonLimits, JsonRejected, loads_guarded
from edgefleet.device.wire.app_trust import key_id_for
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN

__all__ = [
    "ASSIGN_ROOT",
    "EVENT_FILTER",
    "FLEET_TOPIC",
    "MAX_ASSIGNMENT_BYTES",
    "MAX_REPORT_BYTES",
    "PROTOCOL_VERSION",
    "REPORT_LIMITS",
    "SIGNED_VERSION",
    "STATE_FILTER",
    "Assignment",
    "KeyLink",
    "SignedAssignment",
    "canonical_bytes",
    "decode_assignment",
    "decode_director_key",
    "decode_report",
    "decode_signed_assignment",
    "device_of",
    "device_topic",
    "director_key_id",
    "encode_director_key",
    "encode_event",
    "encode_state",
    "event_topic",
    "group_topic",
    "read_report",
    "sign_assignment",
    "sign_key_link",
    "state_topic",
    "target_path",
    "version_key",
]

PROTOCOL_VERSION: Final = 1
#: The ``v`` of a director-signed assignment.
SIGNED_VERSION: Final = 2
_ROOT = f"edgefleet/v{PROTOCOL_VERSION}/update"
ASSIGN_ROOT = f"{_ROOT}/assign"
FLEET_TOPIC = f"{ASSIGN_ROOT}/fleet"
#: What a server subscribes to for every device's retained state and its events.
STATE_FILTER = f"{_ROOT}/state/+"
EVENT_FILTER = f"{_ROOT}/event/+"
#: Largest assignment a device reads; checked before any parsing (a signed one with a
#: full chain of :data:`MAX_CHAIN` key links is about 5 KB).
MAX_ASSIGNMENT_BYTES = 8192
#: Most director key rotations one assignment can carry a device across.
MAX_CHAIN = 16
_ASSIGNMENT_LIMITS = JsonLimits(max_bytes=MAX_ASSIGNMENT_BYTES, max_depth=4, max_keys=96,
                                max_list=MAX_CHAIN, max_string=256)
#: Largest update state or event the server reads, and what it may contain (a state is
#: three levels deep with a few dozen fields).
MAX_REPORT_BYTES = 64 * 1024
REPORT_LIMITS = JsonLimits(max_bytes=MAX_REPORT_BYTES, max_depth=8, max_keys=1024,
                           max_list=256, max_string=4096)
#: Model names and versions as the package manifest allows them (a name is a path part).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_DEVICE = re.compile(DEVICE_ID_PATTERN)
_B64 = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_KEYID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ASSIGNMENT_TYPE = "edgefleet-assignment"
_KEY_LINK_TYPE = "edgefleet-director-key"


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


def version_key(version: str) -> tuple[int, ...]:
    """Numeric order of dotted versions (``1.10.0`` > ``1.9.0``); ValueError if not dotted
    numbers."""
    return tuple(int(p) for p in version.split("."))


def _bad(message: str) -> UpdateRejected:
    return UpdateRejected(message, reason="bad_assignment")


@dataclass(frozen=True)
class Assignment:
    """Which model version a device should run (or shadow).

    ``rollback`` and ``sha256`` mean something only inside a director-signed assignment
    (:class:`SignedAssignment`): a v1 message cannot ask for a downgrade.
    """

    model: str
    version: str
    shadow: bool = False
    rollout: str | None = None
    #: The director allows a version below the highest this device has seen.
    rollback: bool = False
    #: The archive's sha256 the director expects; the device checks TUF agrees.
    sha256: str | None = None

    def __post_init__(self) -> None:
        # Both ends construct through here: the server cannot send what a device refuses.
        if not isinstance(self.model, str) or not _NAME.fullmatch(self.model):
            raise _bad(f"bad model name {self.model!r}")
        if not isinstance(self.version, str) or not _VERSION.fullmatch(self.version):
            raise _bad(f"bad version {self.version!r}")
        if self.sha256 is not None and (not isinstance(self.sha256, str)
                                        or not _SHA256.fullmatch(self.sha256)):
            raise _bad("sha256 is not 64 lowercase hex digits")

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
        """The retained message's payload (v1, unsigned)."""
        return json.dumps({"model": self.model, "version": self.version,
                           "rollout": self.rollout, "shadow": self.shadow}).encode()


def decode_assignment(payload: bytes) -> Assignment | None:
    """Parse a retained assignment; None for the empty message that clears one.

    Raises :class:`UpdateRejected` (``reason`` ``too_large`` or ``bad_assignment``).
    """
    return Assignment.from_dict(_load(payload)) if payload else None


def _load(payload: bytes) -> Any:
    """An assignment's JSON (v1 or v2) read by the guarded reader, whose size check
    comes before anything else; its refusals become ``too_large`` or ``bad_assignment``."""
    try:
        return loads_guarded(payload, _ASSIGNMENT_LIMITS)
    except JsonRejected as exc:
        raise UpdateRejected(f"assignment is not JSON within limits ({exc.reason}): {exc}",
                             reason="too_large" if exc.reason == "too_large"
                             else "bad_assignment") from None


# --- v2: director-signed assignments -------------------------------------------------
def canonical_bytes(obj: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str) or not _B64.fullmatch(text):
        raise _bad(f"{what} is not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise _bad(f"{what} is not base64url") from None


def encode_director_key(public_raw: bytes) -> str:
    """A director public key as its file holds it (``director.pub``): base64, one line."""
    return base64.b64encode(public_raw).decode()


def decode_director_key(text: str) -> bytes:
    """The 32 raw bytes of a ``director.pub`` text; ValueError if it is not one."""
    raw = base64.b64decode(text.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError("not an Ed25519 public key (32 bytes, base64)")
    return raw


def director_key_id(public_raw: bytes) -> str:
    """The id of a director public key (its 32 raw Ed25519 bytes)."""
    return key_id_for(public_raw)


def _public_raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _verify(public_raw: bytes, sig: bytes, data: bytes) -> bool:
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(public_raw).verify(sig, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _forged(message: str) -> UpdateRejected:
    return UpdateRejected(message, reason="bad_signature")


@dataclass(frozen=True)
class KeyLink:
    """One director key rotation: the new public key, signed by the key it replaces."""

    key: str  # base64url of the new key's 32 raw bytes
    prev: str  # id of the key that signed this link
    sig: str  # base64url Ed25519 signature of :meth:`signed_bytes` by ``prev``

    def signed_bytes(self) -> bytes:
        """What the previous key signed."""
        return canonical_bytes({"_type": _KEY_LINK_TYPE, "key": self.key, "prev": self.prev})

    @property
    def public_raw(self) -> bytes:
        """The new key's raw bytes."""
        return _unb64(self.key, "chain key")

    def as_dict(self) -> dict[str, str]:
        """The link as it travels (and as the server stores its chain)."""
        return {"key": self.key, "prev": self.prev, "sig": self.sig}

    @classmethod
    def from_dict(cls, d: Any) -> KeyLink:
        """Validate one link of untrusted input (shapes only; :meth:`SignedAssignment.verify`
        checks signatures)."""
        if not isinstance(d, dict) or set(d) != {"key", "prev", "sig"}:
            raise _bad("a chain link is not {key, prev, sig}")
        if not isinstance(d["prev"], str) or not _KEYID.fullmatch(d["prev"]):
            raise _bad("a chain link's prev is not a key id")
        link = cls(d["key"], d["prev"], d["sig"])
        if len(link.public_raw) != 32 or len(_unb64(link.sig, "chain signature")) != 64:
            raise _bad("a chain link is not an Ed25519 key and signature")
        return link


def sign_key_link(old: ed25519.Ed25519PrivateKey, new_public_raw: bytes) -> KeyLink:
    """The link that moves devices trusting ``old`` to the key ``new_public_raw``."""
    unsigned = KeyLink(_b64(new_public_raw), director_key_id(_public_raw(old)), "")
    return KeyLink(unsigned.key, unsigned.prev, _b64(old.sign(unsigned.signed_bytes())))


@dataclass(frozen=True)
class SignedAssignment:
    """A director-signed assignment for one device, as read from the wire."""

    assignment: Assignment
    device: str
    #: Strictly increasing per device: the device refuses one at or below the last it took.
    seq: int
    #: Unix time after which the device refuses it.
    expires: int
    keyid: str
    sig: bytes
    chain: tuple[KeyLink, ...] = ()
    signed_bytes: bytes = field(default=b"", repr=False)

    @property
    def digest(self) -> str:
        """sha256 of the signed part: what a device remembers of the last one it took."""
        return hashlib.sha256(self.signed_bytes).hexdigest()

    def verify(self, pinned_raw: bytes) -> bytes:
        """Check the signature, walking the key chain from ``pinned_raw``; returns the raw
        key that signed (the device pins it from now on).

        Links signed by a key the device no longer trusts are skipped, so a chain that
        starts before the pinned key is fine; a link that does not verify is a forgery.
        Raises :class:`UpdateRejected` (``bad_signature``).
        """
        current = pinned_raw
        for link in self.chain:
            if link.prev != director_key_id(current):
                continue
            if not _verify(current, _unb64(link.sig, "chain signature"), link.signed_bytes()):
                raise _forged(f"key link from {link.prev} does not verify")
            current = link.public_raw
        if self.keyid != director_key_id(current):
            raise _forged(f"signed by {self.keyid}, not by the pinned director key "
                          f"{director_key_id(current)} or one it rotated to")
        if not _verify(current, self.sig, self.signed_bytes):
            raise _forged("the signature does not verify")
        return current


def sign_assignment(a: Assignment, *, device: str, seq: int, expires: int,
                    key: ed25519.Ed25519PrivateKey, chain: tuple[KeyLink, ...] = ()) -> bytes:
    """The retained payload of a director-signed assignment of ``a`` to ``device``."""
    if not _DEVICE.fullmatch(device):
        raise _bad(f"bad device id {device!r}")
    signed = {"_type": _ASSIGNMENT_TYPE, "device": device, "model": a.model,
              "version": a.version, "shadow": a.shadow, "rollout": a.rollout,
              "rollback": a.rollback, "sha256": a.sha256, "seq": int(seq),
              "expires": int(expires)}
    body = canonical_bytes(signed)
    return json.dumps({"v": SIGNED_VERSION, "signed": signed,
                       "keyid": director_key_id(_public_raw(key)),
                       "sig": _b64(key.sign(body)),
                       "chain": [link.as_dict() for link in chain[-MAX_CHAIN:]]},
                      separators=(",", ":")).encode()


def _int(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value < 2**53:
        raise _bad(f"{what} is not a non-negative integer")
    return value


def decode_signed_assignment(payload: bytes) -> SignedAssignment | None:
    """Parse a director-signed assignment; None for the empty message that clears one.

    Only the shape is checked here; the device verifies with :meth:`SignedAssignment.verify`.
    Raises :class:`UpdateRejected`: ``unsigned_assignment`` for a v1 message, ``too_large``
    or ``bad_assignment`` for anything else that is not a v2 assignment.
    """
    if not payload:
        return None
    data = _load(payload)
    if not isinstance(data, dict):
        raise _bad("assignment is not a JSON object")
    v = data.get("v", PROTOCOL_VERSION)
    if v == PROTOCOL_VERSION and type(v) is int:
        raise UpdateRejected("an unsigned (v1) assignment: this device takes only "
                             "director-signed ones", reason="unsigned_assignment")
    if type(v) is not int or v != SIGNED_VERSION:
        raise _bad(f"unknown assignment version {v!r}")
    signed, chain = data.get("signed"), data.get("chain", [])
    if not isinstance(signed, dict) or signed.get("_type") != _ASSIGNMENT_TYPE:
        raise _bad("no signed assignment in the message")
    if not isinstance(chain, list):
        raise _bad("chain is not a list")
    keyid = data.get("keyid")
    if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid):
        raise _bad("keyid is not a key id")
    device = signed.get("device")
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise _bad("the signed part names no valid device")
    rollout = signed.get("rollout")
    if rollout is not None and (not isinstance(rollout, str) or len(rollout) > 64):
        raise _bad("rollout is not a short string")
    shadow: Any = signed.get("shadow")
    rollback: Any = signed.get("rollback")
    if type(shadow) is not bool or type(rollback) is not bool:
        raise _bad("shadow and rollback must be true or false")
    model: Any = signed.get("model")  # checked in Assignment.__post_init__
    version: Any = signed.get("version")
    a = Assignment(model, version, shadow, rollout, rollback, signed.get("sha256"))
    return SignedAssignment(a, device, _int(signed.get("seq"), "seq"),
                            _int(signed.get("expires"), "expires"), keyid,
                            _unb64(data.get("sig"), "signature"),
                            tuple(KeyLink.from_dict(x) for x in chain),
                            canonical_bytes(signed))


def encode_state(state: dict[str, Any]) -> bytes:
    """A device's retained update state (see docs/updates.md for its fields)."""
    return json.dumps(state).encode()


def encode_event(device: str, kind: str, **data: Any) -> bytes:
    """One update event: ``activated``, ``rejected``, ``rolled_back``, ..."""
    return json.dumps({"device": device, "event": kind, "ts": time.time(), **data}).encode()


def read_report(device: str, payload: bytes) -> dict[str, Any]:
    """A state or event published on ``device``'s own topic, as the server reads it.

    The guarded reader's limits apply (:data:`REPORT_LIMITS`); the result is a JSON object
    whose ``device`` is the topic's (the broker ACL binds that topic to the device's user
    name): a payload naming another device is refused (``device_mismatch``), one naming
    none gets the topic's. Raises :class:`~edgefleet.device.core.guarded_json.JsonRejected`.

    Lenient beyond that on purpose: fields are read one by one where they are used, so a
    device of a newer minor release (more fields) or a partial state is still understood.
    """
    body = loads_guarded(payload, REPORT_LIMITS)
    if not isinstance(body, dict):
        raise JsonRejected(f"a JSON {type(body).__name__}, not an object", reason="malformed")
    claimed = body.get("device", device)
    if claimed != device:
        raise JsonRejected(f"payload names device {str(claimed)[:64]!r}, topic {device!r}",
                           reason="device_mismatch")
    body["device"] = device
    return body


def decode_report(payload: bytes) -> dict[str, Any] | None:
    """A state or event as a JSON object within :data:`REPORT_LIMITS`, or None (ignored).
    Prefer :func:`read_report`, which also binds it to the topic's device."""
    try:
        body = loads_guarded(payload, REPORT_LIMITS)
    except JsonRejected:
        return None
    return body if isinstance(body, dict) else None
