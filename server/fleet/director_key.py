"""The director key: signs which model version each device should run (not a TUF role).

Files in the registry's key ring (``<registry>/keys``, in the fleet home by default)::

    director.pem          Ed25519 private key, 0600, encrypted like the TUF keys
    director.pub          its public half (base64 of the 32 raw bytes): what enrollment
                          bundles carry and devices pin
    director-chain.json   every rotation so far: the new public key signed by the old one

``edgefleet keys init`` creates it; ``edgefleet keys rotate director`` replaces it. A
device moves to a new key only through the chain: every signed assignment carries it,
and a device follows the links that start at the key it trusts (each verified with that
key) before it checks the assignment's signature. The retired private key is kept as
``director.<keyid>.retired.pem`` to be destroyed deliberately.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefleet.device.core.durable import atomic_write_bytes, read_json
from edgefleet.device.core.errors import ConfigError
from edgefleet.device.wire.updates import (
    KeyLink,
    decode_director_key,
    director_key_id,
    encode_director_key,
    sign_key_link,
)
from edgefleet.server.fleet.keys import DIRECTOR, KeyRing

__all__ = ["DIRECTOR", "DirectorKey", "director_key_id", "ensure", "load", "public_file",
           "read_public", "rotate"]

CHAIN_FILE = "director-chain.json"
PUBLIC_FILE = "director.pub"


@dataclass(frozen=True)
class DirectorKey:
    """The director's private key and the rotations that lead devices to it."""

    private: ed25519.Ed25519PrivateKey
    chain: tuple[KeyLink, ...] = ()

    @property
    def public_raw(self) -> bytes:
        """The 32 raw bytes devices pin."""
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    @property
    def keyid(self) -> str:
        """The key's id (what assignments name as ``keyid``)."""
        return director_key_id(self.public_raw)


def public_file(keys_dir: Path) -> Path:
    """Where the director's public key is (the enrollment bundle copies it)."""
    return Path(keys_dir) / PUBLIC_FILE


def read_public(path: Path) -> bytes:
    """The raw public key in ``director.pub`` (what a device pins)."""
    try:
        return decode_director_key(path.read_text(encoding="ascii"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the director key: {exc}", path=str(path)) from None


def _private(ring: KeyRing, path: Path | None = None) -> ed25519.Ed25519PrivateKey:
    key = ring.signer(DIRECTOR, path)._private_key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError("the director key is not Ed25519", path=str(path or ring.path(DIRECTOR)))
    return key


def _write_public(ring: KeyRing, raw: bytes) -> None:
    atomic_write_bytes(public_file(ring.keys_dir), (encode_director_key(raw) + "\n").encode(),
                       mode=0o644)


def _chain(ring: KeyRing) -> tuple[KeyLink, ...]:
    raw = read_json(ring.keys_dir / CHAIN_FILE)
    links = raw.get("links") if isinstance(raw, dict) else None
    return tuple(KeyLink.from_dict(x) for x in links) if isinstance(links, list) else ()


def ensure(ring: KeyRing) -> bool:
    """Create the director key if the ring has none; True when it made one."""
    if ring.exists(DIRECTOR):
        return False
    ring.generate(DIRECTOR)
    _write_public(ring, DirectorKey(_private(ring)).public_raw)
    return True


def load(ring: KeyRing) -> DirectorKey:
    """The director key and its chain (ConfigError when there is none)."""
    if not ring.exists(DIRECTOR):
        raise ConfigError("no director key (run `edgefleet keys init`, or `edgefleet fleet "
                          "init --update` for a registry made before directors)",
                          path=str(ring.path(DIRECTOR)))
    key = DirectorKey(_private(ring), _chain(ring))
    if key.chain and key.chain[-1].key != base64.urlsafe_b64encode(
            key.public_raw).rstrip(b"=").decode():
        raise ConfigError("director.pem is not the key director-chain.json ends with (an "
                          "interrupted rotation? see docs/updates.md)",
                          path=str(ring.path(DIRECTOR)))
    return key


def rotate(ring: KeyRing) -> DirectorKey:
    """A new director key, linked from the current one; returns it.

    Order for crash safety: the new key is written beside the old one, then the chain
    (which names it) is written, then the new key replaces the old one.
    """
    old = load(ring)
    signer, next_path = ring.generate_next(DIRECTOR)
    new = _private(ring, next_path)
    chain = (*old.chain, sign_key_link(old.private, DirectorKey(new).public_raw))
    atomic_write_bytes(ring.keys_dir / CHAIN_FILE, json.dumps(
        {"links": [link.as_dict() for link in chain]}, indent=1).encode())
    ring.retire(DIRECTOR, next_path, old.keyid.removeprefix("edgefleet-"))
    _write_public(ring, DirectorKey(new).public_raw)
    del signer
    return DirectorKey(new, chain)
