"""The registry's signing keys: one Ed25519 key per TUF role, PEM files mode 0600.

``root`` signs which keys may sign the other roles; it is used only by ``keys init`` and
``keys rotate``, so it can live on removable media (``--root-key``) and stay offline.
``targets`` signs what a model package is, ``snapshot`` and ``timestamp`` sign which
metadata is current and must be online for ``registry serve`` to keep timestamps
fresh. A passphrase (``EDGEFLEET_KEY_PASSPHRASE`` or a file) encrypts the PEMs.

The ring also holds the director key (``director.pem``, :data:`DIRECTOR`), which is not a
TUF role: root.json does not name it, and it signs per-device assignments
(:mod:`edgefleet.server.fleet.director_key`).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner

from edgefleet.device.core.durable import fsync_dir
from edgefleet.device.core.errors import ConfigError, EdgefleetError

__all__ = ["DIRECTOR", "ROLES", "KeyRing"]

ROLES = ("root", "targets", "snapshot", "timestamp")
#: The director's key: in this ring, outside TUF.
DIRECTOR = "director"


class KeyRing:
    """Private keys on disk; ``signer(role)`` loads one for signing."""

    def __init__(self, keys_dir: Path, *, passphrase: bytes | None = None,
                 root_key: Path | None = None) -> None:
        self.keys_dir = Path(keys_dir)
        self.passphrase = passphrase or None
        self.root_key = root_key

    def path(self, role: str) -> Path:
        """Where the private key of ``role`` lives."""
        if role not in (*ROLES, DIRECTOR):
            raise ConfigError(f"unknown role {role!r} (one of {', '.join(ROLES)}, {DIRECTOR})")
        if role == "root" and self.root_key is not None:
            return self.root_key
        return self.keys_dir / f"{role}.pem"

    def exists(self, role: str) -> bool:
        """Whether a private key for ``role`` is on this machine."""
        return self.path(role).exists()

    def _write(self, path: Path, signer: CryptoSigner) -> None:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.passphrase) if self.passphrase
            else serialization.NoEncryption())
        pem = signer._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(path.parent)

    def generate(self, role: str) -> CryptoSigner:
        """Create a new key for ``role``; refuses to overwrite an existing one."""
        path = self.path(role)
        if path.exists():
            raise EdgefleetError(f"{path}: a {role} key already exists (use keys rotate)")
        signer = CryptoSigner.generate_ed25519()
        self._write(path, signer)
        return signer

    def generate_next(self, role: str) -> tuple[CryptoSigner, Path]:
        """A new key for ``role`` written beside the current one (``<role>.pem.next``)."""
        path = self.path(role).with_suffix(".pem.next")
        path.unlink(missing_ok=True)
        signer = CryptoSigner.generate_ed25519()
        self._write(path, signer)
        return signer, path

    def retire(self, role: str, next_path: Path, old_keyid: str) -> None:
        """Make the ``.next`` key current; keep the old one as ``<role>.<keyid>.retired.pem``."""
        cur = self.path(role)
        cur.replace(cur.with_name(f"{role}.{old_keyid[:12]}.retired.pem"))
        next_path.replace(cur)
        fsync_dir(cur.parent)

    def signer(self, role: str, path: Path | None = None) -> CryptoSigner:
        """Load the private key of ``role`` (decrypting it with the passphrase)."""
        path = path or self.path(role)
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no {role} key (run edgefleet keys init)", path=str(path)) from None
        if path.stat().st_mode & 0o077:
            raise ConfigError("private key is readable by others (chmod 600)", path=str(path))
        try:
            key = serialization.load_pem_private_key(pem, self.passphrase)
        except TypeError:
            raise ConfigError("key is encrypted: set EDGEFLEET_KEY_PASSPHRASE",
                              path=str(path)) from None
        except ValueError:
            raise ConfigError("cannot decrypt or parse the key (wrong passphrase?)",
                              path=str(path)) from None
        return CryptoSigner(key)
