"""What a device believes of the director: the key it trusts now and the last assignment it took.

The device pins the director's public key at enrollment (``[updates] director_key``).
Each signed assignment (:class:`~edgefleet.device.wire.updates.SignedAssignment`) is
taken only if it verifies against that key (or a key it rotated to through signed key
links), names this device, has not expired, and is newer than the last one taken: its
``seq`` must be above the stored one. The stored state (``director.json``, fsynced
before the device acts) is the trusted key, the last ``seq`` and the digest of the last
signed part, so a restart neither forgets a rotation nor lets an old assignment back in.

The same assignment again (a retained message after a reconnect) is not a replay: it is
the instruction the device already follows, and while it has not expired it is handed
back to be applied again (an interrupted download resumes). Anything older is
``replayed``.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from pathlib import Path

from edgefleet.device.core.durable import atomic_write_json, read_json
from edgefleet.device.core.errors import ConfigError, UpdateRejected
from edgefleet.device.wire.updates import (
    Assignment,
    SignedAssignment,
    decode_director_key,
    director_key_id,
)

__all__ = ["STATE_FILE", "DirectorTrust", "load_public_key"]

log = logging.getLogger(__name__)

STATE_FILE = "director.json"


def load_public_key(path: Path) -> bytes:
    """The 32 raw bytes of the pinned director key file (``director.pub``)."""
    try:
        return decode_director_key(path.read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the director key: {exc}", path=str(path)) from None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class DirectorTrust:
    """The device's director state in ``state_dir/director.json``, pinned to ``pinned``."""

    def __init__(self, state_dir: Path, device_id: str, pinned: bytes, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.device_id = device_id
        self.clock = clock
        raw = read_json(self.path)
        raw = raw if isinstance(raw, dict) else {}
        self.key = pinned
        self.seq = 0
        self.digest = ""
        stored = raw.get("key")
        # A state of another enrollment (another pinned key, never rotated to) is ignored.
        if isinstance(stored, str) and raw.get("pinned") == _b64(pinned):
            try:
                self.key = base64.b64decode(stored, validate=True)
            except ValueError:
                self.key = pinned
            seq = raw.get("seq")
            self.seq = seq if type(seq) is int else 0
            self.digest = str(raw.get("digest", ""))
        self._pinned = pinned

    @property
    def keyid(self) -> str:
        """Id of the director key trusted now."""
        return director_key_id(self.key)

    def accept(self, sa: SignedAssignment) -> Assignment:
        """The assignment to act on, or :class:`UpdateRejected` with the refusal's reason.

        Reasons: ``bad_signature`` (forged, or signed by a key this device does not trust),
        ``wrong_device``, ``expired``, ``replayed``. The new ``seq``, digest and key are
        persisted before this returns, so the device never takes an older one again.
        """
        target = sa.assignment.target
        signer = sa.verify(self.key)
        if sa.device != self.device_id:
            raise UpdateRejected(f"signed for device {sa.device!r}, this is "
                                 f"{self.device_id!r}", reason="wrong_device", target=target)
        if sa.expires <= self.clock():
            raise UpdateRejected(f"expired at {sa.expires}", reason="expired", target=target)
        if sa.digest == self.digest:
            return sa.assignment  # the one it follows now, delivered again
        if sa.seq <= self.seq:
            raise UpdateRejected(f"seq {sa.seq} is not above {self.seq}, the last taken",
                                 reason="replayed", target=target)
        if signer != self.key:
            log.warning("director key rotated: %s -> %s", self.keyid, director_key_id(signer))
        self.key, self.seq, self.digest = signer, sa.seq, sa.digest
        atomic_write_json(self.path, {"pinned": _b64(self._pinned), "key": _b64(self.key),
                                      "seq": self.seq, "digest": self.digest})
        return sa.assignment
