"""Two model slots on disk (A/B) and the pointer that says which one serves.

Layout under the device's state folder::

    slots/a/  slots/b/     two verified package folders
    slots.json             {"active": "a", "previous": "b", "probation": false,
                            "slots": {"a": {name, version, target, sha256, manifest_sha256}}}
    rejected.json          archives (by sha256) that failed a trial or health check

A new package is unpacked into a staging folder, verified, fsynced and renamed over the
*inactive* slot; only then does ``slots.json`` (written atomically) point at it, with
``probation`` set until the health check commits it. After a crash, :meth:`SlotStore.recover`
returns a slot that verifies: an uncommitted probation is rolled back (RAUC-style: a
model that never committed is not trusted), and a slot whose files no longer match is
skipped for the other one.

An encrypted package (:mod:`~edgefleet.device.runtime.envelope`) is decrypted as a
stream straight into the staging folder, which lies inside ``slots/`` (0700) and
becomes the slot: the plaintext exists nowhere else, and its files are 0600.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import atomic_write_json, fsync_dir, fsync_tree, read_json
from edgefleet.device.core.errors import EdgefleetError, PackageError
from edgefleet.device.runtime.archive import ArchiveLimits, extract_package
from edgefleet.device.runtime.envelope import FleetKey, open_package
from edgefleet.device.runtime.manifest import MANIFEST_NAME, Manifest, file_sha256, load_package
from edgefleet.device.runtime.onnx_check import check_no_external_data

__all__ = ["Recovery", "SlotInfo", "SlotStore", "verify_package_dir"]

log = logging.getLogger(__name__)

SLOTS = ("a", "b")


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds: the TUF target it came from and digests to re-verify it."""

    name: str
    version: str
    target: str
    sha256: str
    manifest_sha256: str

    @classmethod
    def from_dict(cls, d: Any) -> SlotInfo | None:
        """Parse a stored entry; None if it is malformed."""
        try:
            return cls(**{k: str(d[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Recovery:
    """What :meth:`SlotStore.recover` decided after a (re)start."""

    slot: str | None
    info: SlotInfo | None
    event: str | None = None  # "rolled_back_after_crash", "active_corrupt", ...


def verify_package_dir(root: Path) -> Manifest:
    """The package checks a slot must pass: manifest, sizes, sha256, paths, no external data."""
    manifest = load_package(root)
    for variant in manifest.variants.values():
        if variant.format == "onnx":
            check_no_external_data(root / variant.file)
    return manifest


class SlotStore:
    """The A/B slots and their pointer file in ``state_dir``."""

    def __init__(self, state_dir: Path, limits: ArchiveLimits | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.slots_dir = self.state_dir / "slots"
        self.slots_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.slots_dir.chmod(0o700)  # decrypted models live here
        self.pointer_path = self.state_dir / "slots.json"
        self.rejected_path = self.state_dir / "rejected.json"
        self.limits = limits or ArchiveLimits()
        self._sweep()

    # --- pointer ---------------------------------------------------------------------
    def pointer(self) -> dict[str, Any]:
        """The current pointer (a fresh default when missing or unreadable)."""
        raw = read_json(self.pointer_path)
        if not isinstance(raw, dict) or not isinstance(raw.get("slots"), dict):
            return {"active": None, "previous": None, "probation": False, "slots": {}}
        return raw

    def _write(self, ptr: dict[str, Any]) -> None:
        atomic_write_json(self.pointer_path, ptr)

    def info(self, slot: str | None) -> SlotInfo | None:
        """What ``slot`` holds according to the pointer."""
        if slot is None:
            return None
        return SlotInfo.from_dict(self.pointer()["slots"].get(slot))

    def path(self, slot: str) -> Path:
        """The folder of ``slot``."""
        return self.slots_dir / slot

    def active(self) -> tuple[str | None, SlotInfo | None]:
        """The active slot and what it holds."""
        slot = self.pointer().get("active")
        return slot, self.info(slot)

    def inactive(self) -> str:
        """The slot a new package goes into."""
        active = self.pointer().get("active")
        return "b" if active == "a" else "a"

    # --- staging ---------------------------------------------------------------------
    def _sweep(self) -> None:
        """Remove staging and trash folders a crash left behind."""
        for p in self.slots_dir.iterdir():
            if p.name.startswith((".staging", ".trash")):
                shutil.rmtree(p, ignore_errors=True)

    def stage(self, archive: Path, name: str, version: str, target: str, sha256: str,
              fault: Any = None, key: FleetKey | None = None) -> tuple[str, Manifest]:
        """Unpack and verify ``archive`` into the inactive slot (the active one is untouched).

        With ``key`` the archive is an encrypted package for ``name@version``, decrypted
        on the fly into the staging folder. Returns the slot and the verified manifest;
        raises :class:`PackageError` when the package fails its own checks or is not the
        model and version it was signed as, :class:`DecryptFailed` when it does not decrypt.
        """
        slot = self.inactive()
        staging = self.slots_dir / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if key is None:
                extract_package(archive, staging, self.limits)
            else:
                with archive.open("rb") as fh:
                    reader = open_package(fh, key, name, version)
                    extract_package(reader, staging, self.limits)
                    reader.finish()
            manifest = verify_package_dir(staging)
            if (manifest.name, manifest.version) != (name, version):
                raise PackageError(f"package is {manifest.name}@{manifest.version}, but it was "
                                   f"signed as {name}@{version}")
            fsync_tree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if fault:
            fault("staged")
        # Forget what the inactive slot held *before* replacing its files, so a crash
        # in between can never pair the old pointer entry with new contents.
        ptr = self.pointer()
        if ptr["slots"].pop(slot, None) is not None or ptr.get("previous") == slot:
            ptr["previous"] = None if ptr.get("previous") == slot else ptr.get("previous")
            self._write(ptr)
        if fault:
            fault("slot_forgotten")
        dest = self.path(slot)
        if dest.exists():
            trash = self.slots_dir / f".trash-{os.getpid()}"
            dest.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(dest)
        fsync_dir(self.slots_dir)
        if fault:
            fault("slot_written")
        ptr = self.pointer()
        ptr["slots"][slot] = asdict(SlotInfo(name, version, target, sha256,
                                             file_sha256(dest / MANIFEST_NAME)))
        self._write(ptr)
        return slot, manifest

    # --- activation ------------------------------------------------------------------
    def activate(self, slot: str) -> None:
        """Point at ``slot`` in probation (uncommitted until :meth:`commit`)."""
        ptr = self.pointer()
        if slot not in ptr["slots"]:
            raise EdgefleetError(f"slot {slot} holds no verified package")
        ptr["previous"], ptr["active"], ptr["probation"] = ptr.get("active"), slot, True
        self._write(ptr)

    def commit(self) -> None:
        """The active slot passed its health check."""
        ptr = self.pointer()
        if ptr.get("probation"):
            ptr["probation"] = False
            self._write(ptr)

    def rollback(self) -> str | None:
        """Point back at the previous slot; returns it (None if there is none)."""
        ptr = self.pointer()
        prev = ptr.get("previous")
        if prev is None or prev not in ptr["slots"]:
            return None
        ptr["active"], ptr["previous"], ptr["probation"] = prev, ptr.get("active"), False
        self._write(ptr)
        return str(prev)

    def slot_ok(self, slot: str) -> bool:
        """Whether ``slot``'s files still match its pointer entry and package checks."""
        info = self.info(slot)
        root = self.path(slot)
        if info is None or not (root / MANIFEST_NAME).is_file():
            return False
        try:
            if file_sha256(root / MANIFEST_NAME) != info.manifest_sha256:
                return False
            verify_package_dir(root)
        except (EdgefleetError, OSError):
            return False
        return True

    def recover(self) -> Recovery:
        """Decide what serves after a start; repairs the pointer if it has to."""
        ptr = self.pointer()
        active, event = ptr.get("active"), None
        if ptr.get("probation"):
            prev = self.rollback()
            log.warning("update was not committed before restart: rolled back to %s", prev)
            active, event = prev, "rolled_back_after_crash"
        if active is not None and not self.slot_ok(active):
            other = "b" if active == "a" else "a"
            log.error("active slot %s does not verify; trying %s", active, other)
            ptr = self.pointer()
            if self.slot_ok(other):
                ptr["active"], ptr["previous"], ptr["probation"] = other, None, False
                active, event = other, "active_corrupt"
            else:
                ptr["active"], active, event = None, None, "no_valid_slot"
            self._write(ptr)
        return Recovery(active, self.info(active), event)

    # --- refused archives ------------------------------------------------------------
    def rejected(self) -> dict[str, Any]:
        """Archives refused after a trial or health check, by sha256."""
        raw = read_json(self.rejected_path)
        return raw if isinstance(raw, dict) else {}

    def reject(self, sha256: str, target: str, reason: str) -> None:
        """Remember that ``sha256`` failed, so it is not fetched and tried again."""
        rej = self.rejected()
        rej[sha256] = {"target": target, "reason": reason}
        atomic_write_json(self.rejected_path, rej)
