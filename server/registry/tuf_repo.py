"""The registry's TUF repository: root, targets, snapshot and timestamp metadata on disk.

Built on python-tuf's ``Repository`` (it does the snapshot/timestamp bookkeeping); we
supply storage and signing. Metadata is written as the files a TUF client asks for
with consistent snapshots: ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``. Snapshot and timestamp pin the length and sha256 of what they
list, so metadata files from different releases cannot be mixed.

:meth:`TufRepo.recover_fast_forward` is the repository half of TUF's fast-forward attack
recovery (client workflow 5.3.11): after someone holding a role's key pushed its version
sky-high, a new root rotates the keys devices must forget that version under, and the
role starts again at version 1 (:data:`RECOVERY`).
"""

from __future__ import annotations

import logging
import re
import shutil
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

__all__ = ["RECOVERY", "Expiry", "TufRepo"]

log = logging.getLogger(__name__)

_VERSIONED = re.compile(r"^(\d+)\.(root|targets|snapshot)\.json$")

#: Fast-forward recovery of a role: (keys rotated in one new root, metadata restarted at
#: version 1). A device drops its trusted timestamp and snapshot (and their floors) when
#: either's keys rotate (TUF 5.3.11), its targets floor when the targets keys rotate;
#: a targets version is also pinned by the trusted snapshot (5.5.5), hence snapshot
#: rotates with targets. What a restarted role is listed in restarts too: python-tuf's
#: repository refuses to list an older version than the one it replaces.
RECOVERY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "timestamp": (("timestamp",), ("timestamp",)),
    "snapshot": (("snapshot",), ("snapshot", "timestamp")),
    "targets": (("targets", "snapshot"), ("targets", "snapshot", "timestamp")),
}


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
        #: Loaded signers by role, with the key file's identity when loaded: another
        #: process (``keys rotate``) may replace the key under a running ``registry serve``.
        self._signers: dict[str, tuple[tuple[int, int], list[Signer]]] = {}
        #: Extra signers for the next root (the old root key signs its successor).
        self.extra_root_signers: list[Signer] = []

    # --- storage -------------------------------------------------------------------
    def _latest(self, role: str) -> Path | None:
        if role == Timestamp.type:
            p = self.metadata_dir / "timestamp.json"
            return p if p.exists() else None
        best: tuple[int, Path] | None = None
        for p in self.metadata_dir.glob(f"*.{role}.json"):
            m = _VERSIONED.fullmatch(p.name)
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
        st = self.keys.path(role).stat()
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._signers.get(role)
        if cached is None or cached[0] != stamp:
            cached = (stamp, [self.keys.signer(role)])
            self._signers[role] = cached
        return cached[1]

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

    def _rotate_keys(self, roles: tuple[str, ...]) -> dict[str, str]:
        """One new root version replacing the keys of ``roles``; their new keyids.

        The new root is signed by the old and the new root key, so devices holding the
        old root can follow.
        """
        old_root_signer = self.keys.signer("root")
        olds = {role: self.keys.signer(role) for role in roles}
        news = {role: self.keys.generate_next(role) for role in roles}
        if Root.type in roles:  # signed by the current (old) root key and the new one
            self.extra_root_signers = [old_root_signer, news["root"][0]]
        try:
            with self.edit_root() as root:
                for role in roles:
                    root.revoke_key(olds[role].public_key.keyid, role)
                    root.add_key(news[role][0].public_key, role)
        finally:
            self.extra_root_signers = []
        for role in roles:
            self.keys.retire(role, news[role][1], olds[role].public_key.keyid)
            self._signers.pop(role, None)
        return {role: str(new.public_key.keyid) for role, (new, _path) in news.items()}

    def rotate(self, role: str) -> str:
        """Replace the key of ``role``; return the new keyid.

        A new root version names the new key (:meth:`_rotate_keys`); then the role's
        own metadata is re-signed with the new key.
        """
        keyid = self._rotate_keys((role,))[role]
        if role == Targets.type:
            with self.edit_targets():
                pass
            self.publish()
        elif role == Snapshot.type:
            self.do_snapshot(force=True)
            self.do_timestamp()
        elif role == Timestamp.type:
            self.do_timestamp(force=True)
        return keyid

    def recover_fast_forward(self, role: str) -> dict[str, str]:
        """Rotate and restart at version 1 what :data:`RECOVERY` says for ``role``.

        For after an attacker holding ``role``'s key pushed a huge version: devices that
        saw it would refuse every honest version below it. The new root rotates the
        keys (the compromised one among them), which tells devices to drop what the old
        keys vouched for; the restarted metadata keeps today's target listing. The
        files being replaced are moved to ``<repo>/fast-forward/<UTC time>/`` (evidence),
        never served again. Returns the new keyids by role.
        """
        if role not in RECOVERY:
            raise ConfigError(f"no fast-forward recovery for {role!r} (one of "
                              f"{', '.join(RECOVERY)}; root versions never restart)")
        rotate, restart = RECOVERY[role]
        listing = self.open(Targets.type)
        keyids = self._rotate_keys(rotate)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        evidence = self.metadata_dir.parent / "fast-forward" / stamp
        evidence.mkdir(parents=True)
        for name in restart:
            files = ([self.metadata_dir / "timestamp.json"] if name == Timestamp.type
                     else list(self.metadata_dir.glob(f"*.{name}.json")))
            for path in files:
                if path.exists():
                    shutil.move(str(path), evidence / path.name)
        if Targets.type in restart:
            listing.signed.version = 0
            self.close(Targets.type, listing)  # v1, signed with the new targets key
        if Snapshot.type in restart:
            self.do_snapshot(force=True)
        self.do_timestamp(force=True)
        log.warning("fast-forward recovery of %s: rotated %s, restarted %s at v1 (old files "
                    "in %s)", role, ", ".join(rotate), ", ".join(restart), evidence)
        return keyids

    def root_bytes(self, version: int = 1) -> bytes:
        """The signed ``N.root.json`` a device is provisioned with."""
        return (self.metadata_dir / f"{version}.root.json").read_bytes()
