"""The fleet's package-encryption key (optional model confidentiality, docs/updates.md).

An X25519 key pair in the fleet home::

    package-key/fleet.key       private (0600): goes to every device in its enrollment bundle
    package-key/fleet.pub       public: what ``registry push --encrypt`` encrypts for
    package-key/previous.pub    the key before the last rotation, still encrypted for
                                until ``keys fleet-key finish-rotation``
    package-key/fleet.<id>.retired.key   rotated-out private keys, kept to be destroyed on purpose

The publisher needs only the public half, so a registry on another machine can encrypt
with a copy of ``fleet.pub``. Generated at run time (``edgefleet keys fleet-key init``),
never committed.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgefleet.device.core.durable import atomic_write_bytes, fsync_dir
from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.envelope import FleetKey, FleetPublicKey

__all__ = ["KEY_DIR", "create", "finish_rotation", "load", "private_path", "publish_keys",
           "rotate"]

KEY_DIR = "package-key"


def _dir(home_root: Path) -> Path:
    return home_root / KEY_DIR


def private_path(home_root: Path) -> Path:
    """``package-key/fleet.key`` of the fleet home."""
    return _dir(home_root) / "fleet.key"


def _write(home_root: Path, key: FleetKey) -> None:
    d = _dir(home_root)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    atomic_write_bytes(d / "fleet.key", key.pem(), 0o600)
    atomic_write_bytes(d / "fleet.pub", key.public.pem(), 0o644)
    fsync_dir(d)


def load(home_root: Path) -> FleetKey | None:
    """The current private key, or None when the fleet does not encrypt packages."""
    path = private_path(home_root)
    return FleetKey.load(path) if path.exists() else None


def create(home_root: Path) -> FleetKey:
    """Generate the key pair; refuses to replace one (that is :func:`rotate`)."""
    if private_path(home_root).exists():
        raise UsageError(f"{private_path(home_root)} exists (use `edgefleet keys fleet-key "
                         "rotate`)")
    key = FleetKey.generate()
    _write(home_root, key)
    return key


def rotate(home_root: Path) -> tuple[FleetPublicKey, FleetKey]:
    """A new key pair; the old public key stays in the publish set until
    :func:`finish_rotation`, the old private key is kept as a retired file."""
    old = load(home_root)
    if old is None:
        raise UsageError("no fleet key to rotate (run `edgefleet keys fleet-key init`)")
    d = _dir(home_root)
    os.replace(d / "fleet.key", d / f"fleet.{old.public.key_id}.retired.key")
    atomic_write_bytes(d / "previous.pub", old.public.pem(), 0o644)
    new = FleetKey.generate()
    _write(home_root, new)
    return old.public, new


def finish_rotation(home_root: Path) -> FleetPublicKey | None:
    """Stop encrypting for the previous key (every device has re-enrolled)."""
    prev = _dir(home_root) / "previous.pub"
    if not prev.exists():
        return None
    key = FleetPublicKey.load(prev)
    prev.unlink()
    fsync_dir(prev.parent)
    return key


def publish_keys(folder: Path) -> list[FleetPublicKey]:
    """The public keys new packages are encrypted for: ``fleet.pub`` (+ ``previous.pub``).

    ``folder`` is a fleet home or a ``package-key`` folder copied to the registry host.
    """
    d = folder if (folder / "fleet.pub").is_file() else _dir(folder)
    if not (d / "fleet.pub").is_file():
        raise UsageError(f"no fleet.pub in {d} (run `edgefleet keys fleet-key init`)")
    keys = [FleetPublicKey.load(d / "fleet.pub")]
    if (d / "previous.pub").is_file():
        keys.append(FleetPublicKey.load(d / "previous.pub"))
    return keys
