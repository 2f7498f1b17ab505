"""Signed Flower apps: how a fleet's signature on a FAB reaches its SuperNodes.

Flower verifies FABs on the SuperNode itself (``flower-supernode --trusted-entities
FILE.yaml``: a map ``key id -> "ssh-ed25519 ..."``): a FAB is accepted only if one of its
verification records is an Ed25519 signature, by a trusted key, over
``signed_at (8 bytes big-endian) || sha256(FAB)``; otherwise the SuperNode answers the
message with an error reply and never installs or runs the app.

In Flower 1.42 the SuperLink attaches verification records only to apps it downloads
from Flower Hub (``flwr run @publisher/app==version``); for a FAB submitted from disk
(``flwr run ./app``, how every edgefleet run starts) it stores none, so a SuperNode with
trusted entities refuses every such run, signed or not. edgefleet therefore carries the
record in the run itself: the submitter signs the exact FAB bytes ``flwr run`` sends and
puts the record in the run config under :data:`SIGNATURE_KEY`; the device's SuperNode
(:mod:`edgefleet.device.fl.supernode`) hands it to Flower's unchanged verification as
the FAB's verification record. The record format is Flower's own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass

__all__ = ["SIGNATURE_KEY", "AppSignature", "key_id_for", "trusted_entities_yaml"]

#: Run-config key of the signature record (declared empty in the app's pyproject.toml).
SIGNATURE_KEY = "app-signature"
_KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_B64URL = re.compile(r"^[A-Za-z0-9_-]{1,200}$")


def key_id_for(public_key_raw: bytes) -> str:
    """A stable id of an Ed25519 public key (its 32 raw bytes)."""
    return "edgefleet-" + hashlib.sha256(public_key_raw).hexdigest()[:16]


def trusted_entities_yaml(key_id: str, public_openssh: str) -> str:
    """Flower's ``--trusted-entities`` file trusting exactly this key."""
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"bad key id {key_id!r}")
    return f"# edgefleet: the only key this SuperNode accepts Flower apps from\n" \
           f"{key_id}: {json.dumps(public_openssh.strip())}\n"


@dataclass(frozen=True)
class AppSignature:
    """One Flower verification record: who signed, when, and the signature (base64url)."""

    key_id: str
    signed_at: int
    signature: str

    def encode(self) -> str:
        """The run-config value: ``<key id>.<signed_at>.<signature>``."""
        return f"{self.key_id}.{self.signed_at}.{self.signature}"

    @classmethod
    def decode(cls, value: object) -> AppSignature | None:
        """Parse a run-config value; ``None`` for anything that is not a record."""
        if not isinstance(value, str) or len(value) > 512:  # a record is ~150 characters
            return None
        parts = value.split(".")
        if (len(parts) != 3 or not _KEY_ID.fullmatch(parts[0]) or not parts[1].isascii()
                or not parts[1].isdigit() or len(parts[1]) > 12
                or not _B64URL.fullmatch(parts[2])):
            return None
        try:
            base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        except ValueError:
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    def verification(self) -> dict[str, str]:
        """The record as a FAB's ``verifications`` entries, in Flower's format."""
        return {self.key_id: json.dumps({"signature": self.signature,
                                         "signed_at": self.signed_at})}
