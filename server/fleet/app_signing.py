"""The fleet's Flower-app signing key: every run's FAB is signed with it, devices trust only it.

An Ed25519 key in the fleet home (``app-signing/app.key``, PEM, 0600, created on first
use or by ``edgefleet fleet init``; never leaves the server) and its public half in
OpenSSH form (``app-signing/app.pub``), which the enrollment bundle carries to every
device as Flower's trusted-entities file (``app-trust.yaml``). Signatures use Flower's
own record format (:mod:`edgefleet.device.wire.app_trust`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgefleet.device.wire.app_trust import AppSignature, key_id_for, trusted_entities_yaml

__all__ = ["AppSigningKey", "build_fab", "fleet_key", "load_or_create"]

KEY_DIR = "app-signing"


@dataclass(frozen=True)
class AppSigningKey:
    """A private Ed25519 key and the id devices know it by."""

    private: ed25519.Ed25519PrivateKey

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id_for(self.public_raw)

    @property
    def public_openssh(self) -> str:
        return self.private.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    def trusted_entities(self) -> str:
        """The YAML a SuperNode passes to ``--trusted-entities`` to trust only this key."""
        return trusted_entities_yaml(self.key_id, self.public_openssh)

    def sign(self, fab: bytes, signed_at: int | None = None) -> AppSignature:
        """Flower's record: Ed25519 over ``signed_at (8 bytes BE) || sha256(fab)``."""
        ts = int(time.time()) if signed_at is None else signed_at
        message = ts.to_bytes(8, "big") + hashlib.sha256(fab).digest()
        sig = base64.urlsafe_b64encode(self.private.sign(message)).rstrip(b"=").decode()
        return AppSignature(self.key_id, ts, sig)


def load_or_create(folder: Path) -> AppSigningKey:
    """The key in ``folder``/app.key, generated (with app.pub) if there is none."""
    key_path = folder / "app.key"
    if key_path.is_file():
        priv = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(priv, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{key_path} is not an Ed25519 key")
        return AppSigningKey(priv)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    key = AppSigningKey(ed25519.Ed25519PrivateKey.generate())
    pem = key.private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    tmp = key_path.with_name(".app.key.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    tmp.replace(key_path)
    (folder / "app.pub").write_text(key.public_openssh + "\n")
    return key


def fleet_key(home_root: Path) -> AppSigningKey:
    """The signing key of the fleet whose home is ``home_root`` (created on first use)."""
    return load_or_create(home_root / KEY_DIR)


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr run app_dir`` sends (Flower's own builder; deterministic)."""
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(app_dir))
