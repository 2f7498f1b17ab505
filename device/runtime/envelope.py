"""Encrypted model packages: a data key per package, wrapped for the fleet's X25519 key.

Why this shape: the publisher (registry) must be able to encrypt with only the fleet's
*public* key, and a device must decrypt with a key it received at enrollment, so the
data key is wrapped ECIES-style (ephemeral X25519, HKDF-SHA256, AES-256-GCM). The
package tar is encrypted in authenticated chunks (AES-256-GCM, STREAM construction:
counter nonce plus a last-chunk flag) so a device never holds a whole model in memory
and a tar parser only ever sees bytes whose tag verified. Every tag covers the header
and the model name and version, so a ciphertext cannot be moved to another package.

Layout (docs/model-package.md, "Encrypted packages")::

    magic "EFENC\\r\\n\\x1a\\n"  8 bytes
    format version 1, suite 1     1 + 1 bytes
    chunk size                    4 bytes, big-endian (plaintext bytes per chunk)
    recipients n (1..8)           1 byte
    n x (key id 8, ephemeral X25519 public 32, wrapped data key 32 + tag 16)
    chunks: AES-256-GCM(data key, nonce = counter (11 bytes BE) || last (1 byte))

TUF signs the encrypted file; the device checks TUF first, then this.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefleet.device.core.errors import ConfigError, DecryptFailed, UpdateRejected

__all__ = ["CHUNK_BYTES", "MAGIC", "SUITE", "FleetKey", "FleetPublicKey", "PackageReader",
           "encrypt_package", "is_encrypted", "open_package", "read_key_ids"]

MAGIC = b"EFENC\r\n\x1a"
FORMAT_VERSION = 1
#: Suite 1: X25519 + HKDF-SHA256 key wrap, AES-256-GCM data chunks.
SUITE = 1
SUITE_NAME = "x25519-hkdf-sha256-aes256gcm"
CHUNK_BYTES = 1 << 20
MIN_CHUNK, MAX_CHUNK = 4096, 16 << 20
MAX_RECIPIENTS = 8
_TAG = 16
_FIXED = struct.Struct(">8sBBIB")  # magic, version, suite, chunk size, recipients
_RECIPIENT = 8 + 32 + 32 + _TAG
_WRAP_INFO = b"edgefleet package key v1"


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _binding(model: str, version: str) -> bytes:
    """What ties a ciphertext to one package: it is in every tag's associated data."""
    return b"\0edgefleet-model\0" + model.encode() + b"\0" + version.encode()


@dataclass(frozen=True)
class FleetPublicKey:
    """What a publisher needs to encrypt for the fleet (safe to copy anywhere)."""

    raw: bytes

    @property
    def key_id(self) -> str:
        """16 hex digits naming the key in package headers and TUF custom fields."""
        return hashlib.sha256(b"edgefleet fleet key\0" + self.raw).hexdigest()[:16]

    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM (``fleet.pub``)."""
        return X25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    @classmethod
    def load(cls, path: Path) -> FleetPublicKey:
        """Read a PEM X25519 public key."""
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the fleet public key: {exc}", path=str(path)) from None
        if not isinstance(key, X25519PublicKey):
            raise ConfigError("not an X25519 public key", path=str(path))
        return cls(_raw_public(key))


@dataclass(frozen=True)
class FleetKey:
    """The fleet's private key: on the fleet home (for bundles) and on each device."""

    private: X25519PrivateKey

    @property
    def public(self) -> FleetPublicKey:
        return FleetPublicKey(_raw_public(self.private.public_key()))

    @classmethod
    def generate(cls) -> FleetKey:
        return cls(X25519PrivateKey.generate())

    def pem(self) -> bytes:
        """PKCS#8 PEM, unencrypted: the file itself is 0600."""
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @classmethod
    def load(cls, path: Path) -> FleetKey:
        """Read the key, refusing a file readable by group or others."""
        try:
            if path.stat().st_mode & 0o077:
                raise ConfigError("the fleet key is readable by group or others (chmod 600)",
                                  path=str(path))
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the fleet key: {exc}", path=str(path)) from None
        if not isinstance(key, X25519PrivateKey):
            raise ConfigError("not an X25519 private key", path=str(path))
        return cls(key)


def _kek(shared: bytes, eph: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None,
                info=_WRAP_INFO + eph + recipient).derive(shared)


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\1" if last else b"\0")


def _read_exact(src: BinaryIO, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        more = src.read(n - len(buf))
        if not more:
            break
        buf += more
    return buf


def is_encrypted(path: Path) -> bool:
    """Whether the file starts with the envelope's magic."""
    with path.open("rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def encrypt_package(src: Path, dest: Path, recipients: Sequence[FleetPublicKey], model: str,
                    version: str, chunk_size: int = CHUNK_BYTES) -> Path:
    """Encrypt the package tar ``src`` into ``dest`` (0600) for every key in ``recipients``."""
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise ValueError(f"1 to {MAX_RECIPIENTS} recipients, not {len(recipients)}")
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk size {chunk_size} outside {MIN_CHUNK}..{MAX_CHUNK}")
    binding = _binding(model, version)
    fixed = _FIXED.pack(MAGIC, FORMAT_VERSION, SUITE, chunk_size, len(recipients))
    data_key = AESGCM.generate_key(256)
    header = fixed
    for pub in recipients:
        eph = X25519PrivateKey.generate()
        eph_raw = _raw_public(eph.public_key())
        shared = eph.exchange(X25519PublicKey.from_public_bytes(pub.raw))
        kid = bytes.fromhex(pub.key_id)
        wrapped = AESGCM(_kek(shared, eph_raw, pub.raw)).encrypt(
            bytes(12), data_key, fixed + kid + eph_raw + binding)
        header += kid + eph_raw + wrapped
    aead, aad = AESGCM(data_key), header + binding
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with src.open("rb") as inp, os.fdopen(fd, "wb") as out:
        out.write(header)
        chunk, counter = inp.read(chunk_size), 0
        while True:
            nxt = inp.read(chunk_size)
            out.write(aead.encrypt(_nonce(counter, not nxt), chunk, aad))
            if not nxt:
                break
            chunk, counter = nxt, counter + 1
        out.flush()
        os.fsync(out.fileno())
    return dest


@dataclass(frozen=True)
class _Header:
    raw: bytes
    fixed: bytes
    chunk_size: int
    recipients: list[tuple[str, bytes, bytes]]  # key id, ephemeral public, wrapped key


def _read_header(src: BinaryIO) -> _Header:
    fixed = _read_exact(src, _FIXED.size)
    if len(fixed) < _FIXED.size or fixed[:len(MAGIC)] != MAGIC:
        raise DecryptFailed("not an encrypted package (bad magic or short header)")
    _magic, ver, suite, chunk, n = _FIXED.unpack(fixed)
    if ver != FORMAT_VERSION or suite != SUITE:
        raise DecryptFailed(f"unsupported envelope (format {ver}, suite {suite})")
    if not MIN_CHUNK <= chunk <= MAX_CHUNK or not 1 <= n <= MAX_RECIPIENTS:
        raise DecryptFailed(f"envelope header out of bounds (chunk {chunk}, {n} recipients)")
    body = _read_exact(src, n * _RECIPIENT)
    if len(body) < n * _RECIPIENT:
        raise DecryptFailed("envelope header is truncated")
    recips = [(body[i:i + 8].hex(), body[i + 8:i + 40], body[i + 40:i + _RECIPIENT])
              for i in range(0, len(body), _RECIPIENT)]
    return _Header(fixed + body, fixed, chunk, recips)


def read_key_ids(path: Path) -> list[str]:
    """The fleet key ids a package is encrypted for (raises :class:`DecryptFailed`)."""
    with path.open("rb") as fh:
        return [kid for kid, _e, _w in _read_header(fh).recipients]


class PackageReader(io.RawIOBase):
    """The plaintext of an encrypted package as a stream, each chunk verified before use.

    Call :meth:`finish` after the consumer stops reading: it verifies the remaining
    chunks up to the one flagged last, so a truncated or extended ciphertext is refused.
    """

    def __init__(self, src: BinaryIO, key: FleetKey, model: str, version: str) -> None:
        super().__init__()
        self._src = src
        header = _read_header(src)
        binding = _binding(model, version)
        mine = key.public
        entry = next((r for r in header.recipients if r[0] == mine.key_id), None)
        if entry is None:
            have = ", ".join(r[0] for r in header.recipients)
            raise UpdateRejected(f"encrypted for fleet key {have}, this device holds "
                                 f"{mine.key_id} (re-enroll it, or publish for its key)",
                                 reason="wrong_fleet_key")
        kid, eph, wrapped = entry
        try:
            shared = key.private.exchange(X25519PublicKey.from_public_bytes(eph))
            data_key = AESGCM(_kek(shared, eph, mine.raw)).decrypt(
                bytes(12), wrapped, header.fixed + bytes.fromhex(kid) + eph + binding)
        except (InvalidTag, ValueError):
            raise DecryptFailed("the wrapped data key does not open with this fleet key for "
                                f"{model}@{version}") from None
        self._aead = AESGCM(data_key)
        self._aad = header.raw + binding
        self._chunk_ct = header.chunk_size + _TAG
        self._counter = 0
        self._pending = _read_exact(src, self._chunk_ct)
        self._buf = b""
        self._done = False

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        ct = self._pending
        nxt = _read_exact(self._src, self._chunk_ct)
        last = not nxt
        try:
            plain = self._aead.decrypt(_nonce(self._counter, last), ct, self._aad)
        except (InvalidTag, ValueError):
            raise DecryptFailed(f"chunk {self._counter} does not authenticate (tampered, "
                                "truncated, or not this package)") from None
        self._counter += 1
        self._pending, self._done = nxt, last
        return plain

    def readinto(self, b: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._buf and not self._done:
            self._buf = self._next_chunk()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def finish(self) -> None:
        """Verify every chunk not read yet, through the last one."""
        self._buf = b""
        while not self._done:
            self._next_chunk()


def open_package(src: BinaryIO, key: FleetKey, model: str, version: str) -> PackageReader:
    """A verified plaintext stream of the encrypted package ``src`` for ``model@version``."""
    return PackageReader(src, key, model, version)
