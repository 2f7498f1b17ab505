"""The registry's TUF repository: root, targets, snapshot and timestamp metadata on disk.

Built on python-tuf's ``Repository`` (it does the snapshot/timestamp bookkeeping); we
supply storage and signing. Metadata is written as the files a TUF client asks for
with consistent snapshots: ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``. Snapshot and timestamp pin the length and sha256 of what they
list, so metadata files from different releases cannot be mixed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.repository import Repository

from edgefleet.device.core.durable import atomic_write_bytes
from edgefleet.device.core.errors import ConfigError
from edgefleet.server.fleet.keys import ROLES, KeyRing

__all__ = ["Expiry", "TufRepo"]

log = logging.getLogger(__name__)

_VERSIONED = re.compile(r"^(\d+)\.(root|targets|snapshot)\.json$")


@dataclass
class Expiry:
    """How long each role's metadata stays valid after signing."""

    days: dict[str, float] = field(default_factory=lambda: {
        "root": 365.0, "targets": 90.0, "snapshot": 30.0, "timestamp": 1.0})

    def of(self, role: str) -> datetime:
        """The expiry of a ``role`` signed now (whole seconds, as TUF requires)."""
        now = datetime.now(UTC).replace(microsecond=0)
        return now + timedelta(days=self.days[role])


class TufRepo(Repository):
    """Metadata in ``root_dir/metadata``; signing keys from a :class:`KeyRing`."""

    def __init__(self, root_dir: Path, keys: KeyRing, expiry: Expiry | None = None) -> None:
        self.metadata_dir = Path(root_dir) / "metadata"
        self.keys = keys
        self.expiry = expiry or Expiry()
        self._signers: dict[str, list[Signer]] = {}
        #: Extra signers for the next root (the old root key signs its successor).
        self.extra_root_signers: list[Signer] = []

    # --- storage -------------------------------------------------------------------
    def _latest(self, role: str) -> Path | None:
        if role == Timestamp.type:
            p = self.metadata_dir / "timestamp.json"
            return p if p.exists() else None
        best: tuple[int, Path] | None = None
        for p in self.metadata_dir.glob(f"*.{role}.json"):
            m = _VERSIONED.match(p.name)
            if m and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), p)
        return best[1] if best else None

    def exists(self) -> bool:
        """Whether this repository has been initialized."""
        return self._latest(Root.type) is not None

    def open(self, role: str) -> Metadata[Any]:
        path = self._latest(role)
        if path is not None:
            return Metadata.from_bytes(path.read_bytes())
        signed: Root | Targets | Snapshot | Timestamp = {
            "root": Root, "targets": Targets, "snapshot": Snapshot, "timestamp": Timestamp,
        }[role]()
        if isinstance(signed, Root):
            signed.consistent_snapshot = True
        signed.version = 0
        return Metadata(signed)

    def _signers_for(self, role: str) -> list[Signer]:
        if role not in self._signers:
            self._signers[role] = [self.keys.signer(role)]
        return self._signers[role]

    def close(self, role: str, md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.expires = self.expiry.of(role)
        md.signatures.clear()
        signers = list(self._signers_for(role))
        if role == Root.type:
            signers += self.extra_root_signers
        for signer in signers:
            md.sign(signer, append=True)
        data = md.to_bytes()
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        if role == Timestamp.type:
            atomic_write_bytes(self.metadata_dir / "timestamp.json", data, 0o644)
        else:
            atomic_write_bytes(self.metadata_dir / f"{md.signed.version}.{role}.json", data,
                               0o644)
        log.info("signed %s v%d", role, md.signed.version)

    def _metafile(self, role: str) -> MetaFile:
        path = self._latest(role)
        if path is None:
            return MetaFile(version=0)
        data = path.read_bytes()
        version = int(Metadata.from_bytes(data).signed.version)
        return MetaFile.from_data(version, data, ["sha256"])

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {"targets.json": self._metafile(Targets.type)}

    @property
    def snapshot_info(self) -> MetaFile:
        return self._metafile(Snapshot.type)

    # --- operations ----------------------------------------------------------------
    def initialize(self) -> None:
        """Create root v1 naming one key per role, then targets, snapshot and timestamp."""
        if self.exists():
            raise ConfigError("the TUF repository already exists", path=str(self.metadata_dir))
        with self.edit_root() as root:
            for role in ROLES:
                root.add_key(self.keys.signer(role).public_key, role)
        with self.edit_targets():
            pass
        self.publish()

    def publish(self) -> None:
        """Sign a new snapshot and timestamp if targets changed."""
        self.do_snapshot()
        self.do_timestamp()

    def refresh_timestamp(self) -> None:
        """Re-sign the timestamp so devices do not see it expire (``registry serve``)."""
        self.do_timestamp(force=True)

    def add_target(self, path: str, local: Path, custom: dict[str, Any]) -> TargetFile:
        """Sign ``local`` as target ``path`` with our ``custom`` fields, then publish."""
        info = TargetFile.from_file(path, str(local), ["sha256"])
        info.unrecognized_fields["custom"] = custom
        with self.edit_targets() as targets:
            targets.targets[path] = info
        self.publish()
        return info

    def remove_target(self, path: str) -> bool:
        """Stop vouching for ``path`` (a yanked version); True if it was listed."""
        with self.edit_targets() as targets:
            found = targets.targets.pop(path, None) is not None
        self.publish()
        return found

    def targets_listed(self) -> Iterator[tuple[str, TargetFile]]:
        """Every target the current targets metadata vouches for."""
        yield from self.targets().targets.items()

    def rotate(self, role: str) -> str:
        """Replace the key of ``role``; return the new keyid.

        A new root version names the new key and is signed by the old and the new
        root key, so devices holding the old root can follow; then the role's own
        metadata is re-signed with the new key.
        """
        old_root_signer = self.keys.signer("root")
        old = self.keys.signer(role)
        new, next_path = self.keys.generate_next(role)
        if role == Root.type:
            self.extra_root_signers = [old_root_signer]
            self._signers["root"] = [new]
        with self.edit_root() as root:
            root.revoke_key(old.public_key.keyid, role)
            root.add_key(new.public_key, role)
        self.extra_root_signers = []
        self.keys.retire(role, next_path, old.public_key.keyid)
        self._signers.pop(role, None)
        if role == Targets.type:
            with self.edit_targets():
                pass
            self.publish()
        elif role == Snapshot.type:
            self.do_snapshot(force=True)
            self.do_timestamp()
        elif role == Timestamp.type:
            self.do_timestamp(force=True)
        return str(new.public_key.keyid)

    def root_bytes(self, version: int = 1) -> bytes:
        """The signed ``N.root.json`` a device is provisioned with."""
        return (self.metadata_dir / f"{version}.root.json").read_bytes()
