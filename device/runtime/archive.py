"""A model package as one file: an uncompressed tar, the unit TUF signs and ships.

TUF signs files, and a package is a folder, so the registry packs it into a tar whose
sha256 and length go into the signed targets metadata. Unpacking on the device trusts
nothing inside the tar even though its hash was signed (a signer can be careless or
compromised): only regular files, names that stay inside the folder, a bounded number
of members and bytes. Extracted files then go through :func:`load_package`. What is
unpacked is owner-only (files 0600, folders 0700): a decrypted model
(:mod:`.envelope`) must not be readable by other users of the device.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

from edgefleet.device.core.errors import PackageError
from edgefleet.device.runtime.manifest import MANIFEST_NAME, load_package, safe_member

__all__ = ["ArchiveLimits", "extract_package", "pack_package"]


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what a package archive may unpack to."""

    max_members: int = 64
    max_total_bytes: int = 256 * 1024 * 1024


def pack_package(src: Path, dest: Path) -> Path:
    """Verify the package in ``src`` and write it as a tar to ``dest`` (sorted, no owners)."""
    manifest = load_package(src)
    names = [MANIFEST_NAME, *sorted(manifest.files)]
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in names:
            info = tar.gettarinfo(str(safe_member(src, rel)), arcname=rel)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with (src / rel).open("rb") as fh:
                tar.addfile(info, fh)
    return dest


def extract_package(archive: Path | BinaryIO | io.RawIOBase, dest: Path,
                    limits: ArchiveLimits | None = None) -> Path:
    """Unpack ``archive`` (a tar file, or a stream of one) into the new folder ``dest``.

    Refuses anything but plain files: raises :class:`PackageError` for links, devices,
    absolute or ``..`` names, duplicates, or more members or bytes than ``limits`` allow.
    A stream (a decrypting :class:`~.envelope.PackageReader`) is read once, in order, so
    the plaintext tar never exists as a file.
    """
    lim = limits or ArchiveLimits()
    dest.mkdir(mode=0o700, parents=True, exist_ok=False)
    seen: set[str] = set()
    total = 0
    where = str(archive) if isinstance(archive, Path) else str(dest)
    try:
        # closed by the with below
        tar = (tarfile.open(archive, "r:") if isinstance(archive, Path)  # noqa: SIM115
               else tarfile.open(fileobj=cast(IO[bytes], archive), mode="r|"))  # noqa: SIM115
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"not a package archive: {exc}", path=where) from None
    with tar:
        try:
            for count, info in enumerate(tar, start=1):
                if count > lim.max_members:
                    raise PackageError(f"more than {lim.max_members} files", path=where)
                if not info.isreg():
                    raise PackageError(f"{info.name!r} is not a regular file",
                                       path=where)
                target = safe_member(dest, info.name)
                if info.name in seen:
                    raise PackageError(f"{info.name!r} appears twice", path=where)
                seen.add(info.name)
                total += info.size
                if total > lim.max_total_bytes:
                    raise PackageError(f"unpacks to more than {lim.max_total_bytes} bytes",
                                       path=where)
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                src = tar.extractfile(info)
                if src is None:
                    raise PackageError(f"{info.name!r} cannot be read", path=where)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
        except tarfile.TarError as exc:
            raise PackageError(f"corrupt package archive: {exc}", path=where) from None
    return dest
