"""The model registry: versions, lineage and metrics in SQLite, artifacts by sha256, TUF-signed.

A registry home holds ``registry.db`` (one row per model version), ``artifacts/<sha256>``
(package archives, content-addressed, so the same bytes are stored once and the name
says what they must hash to), ``repo/metadata`` (TUF metadata) and ``audit.jsonl``.
Pushing verifies the package, packs it, signs it into the targets metadata as
``<name>/<version>.tar`` (:func:`~edgefleet.device.wire.updates.target_path`, the name
devices fetch) and records an audit entry.

Pushing with ``encrypt_for`` (fleet public keys, :mod:`~edgefleet.device.runtime.envelope`)
stores and signs the *encrypted* archive: the registry, its web server and any CDN hold
only ciphertext, TUF's hashes are of the ciphertext, and the signed target's
``custom.encryption`` names the suite and key ids so a device can refuse before it
downloads. Encryption is randomized, so "same contents" means the same plaintext archive
(``content_sha256``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import fsync_dir
from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.sqlite import connect, migrate
from edgefleet.device.runtime.archive import pack_package
from edgefleet.device.runtime.envelope import SUITE_NAME, FleetPublicKey, encrypt_package
from edgefleet.device.runtime.manifest import file_sha256, load_package, safe_member
from edgefleet.device.runtime.onnx_check import check_no_external_data
from edgefleet.device.wire.updates import target_path, version_key
from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.registry.tuf_repo import Expiry, TufRepo

__all__ = ["MIGRATIONS", "ModelRecord", "Registry", "parse_ref", "version_key"]

#: Schema versions of the model table in ``registry.db`` (:mod:`~edgefleet.device.core.sqlite`),
#: recorded in ``registry_migrations`` (rollouts live in their own ``rollouts.db``).
#: Version 1 is the table it had before versions were recorded, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: model versions
        """CREATE TABLE IF NOT EXISTS model_versions (
            name TEXT NOT NULL, version TEXT NOT NULL, task TEXT NOT NULL,
            sha256 TEXT NOT NULL, size INTEGER NOT NULL, target TEXT NOT NULL,
            created TEXT NOT NULL, pushed_at REAL NOT NULL,
            lineage TEXT NOT NULL, metrics TEXT NOT NULL, yanked INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (name, version))""",
    ],
    [  # 2: encrypted packages: the plaintext archive's digest, the fleet keys it is for
        "ALTER TABLE model_versions ADD COLUMN content_sha256 TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE model_versions ADD COLUMN encrypted_for TEXT NOT NULL DEFAULT ''",
    ],
]


@dataclass(frozen=True)
class ModelRecord:
    """One registered model version."""

    name: str
    version: str
    task: str
    sha256: str
    size: int
    target: str
    created: str
    pushed_at: float
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    yanked: bool
    #: sha256 of the plaintext archive (== ``sha256`` unless encrypted).
    content_sha256: str = ""
    #: Fleet key ids the stored archive is encrypted for (empty: plaintext).
    encrypted_for: tuple[str, ...] = ()

    @property
    def encrypted(self) -> bool:
        return bool(self.encrypted_for)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {**self.__dict__, "encrypted_for": list(self.encrypted_for)}


class Registry:
    """One registry home folder."""

    def __init__(self, home: Path, keys: KeyRing | None = None,
                 expiry: Expiry | None = None) -> None:
        self.home = Path(home)
        self.artifacts = self.home / "artifacts"
        self.keys = keys or KeyRing(self.home / "keys")
        self.repo = TufRepo(self.home / "repo", self.keys, expiry)
        self.audit = AuditLog(self.home / "audit.jsonl")
        self.home.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        self._db = connect(self.home / "registry.db")
        migrate(self._db, MIGRATIONS, table="registry_migrations",
                what="registry.db has model schema")

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def init_repo(self) -> None:
        """Create the TUF repository (keys must exist) and record it."""
        self.repo.initialize()
        self.audit.append("registry.init", root_version=1)

    def push(self, package: Path, *, actor: str | None = None,
             encrypt_for: list[FleetPublicKey] | None = None) -> ModelRecord:
        """Verify, pack, store and sign a package; refuse a changed re-push of a version.

        ``encrypt_for``: store and sign the archive encrypted for these fleet keys.
        """
        manifest = load_package(package)
        for variant in manifest.variants.values():
            if variant.format == "onnx":
                check_no_external_data(safe_member(package, variant.file))
        existing = self.get(manifest.name, manifest.version)
        key_ids = tuple(k.key_id for k in encrypt_for or ())
        with tempfile.TemporaryDirectory(dir=self.home) as tmp:
            archive = pack_package(package, Path(tmp) / "package.tar")
            content = file_sha256(archive)
            if existing is not None:
                if (existing.content_sha256 or existing.sha256) != content:
                    raise UsageError(f"{manifest.name}@{manifest.version} is already registered "
                                     "with different contents: bump the version")
                if set(existing.encrypted_for) != set(key_ids):
                    how = (f"encrypted for {', '.join(existing.encrypted_for)}"
                           if existing.encrypted else "unencrypted")
                    raise UsageError(f"{manifest.name}@{manifest.version} is already registered "
                                     f"{how}: bump the version to publish it otherwise")
                return existing
            if encrypt_for:
                archive = encrypt_package(archive, Path(tmp) / "package.enc", encrypt_for,
                                          manifest.name, manifest.version)
            digest = file_sha256(archive)
            stored = self.artifacts / digest
            if not stored.exists():
                os.chmod(archive, 0o644)
                shutil.move(str(archive), stored)
                fsync_dir(self.artifacts)
        target = target_path(manifest.name, manifest.version)
        custom: dict[str, Any] = {"model": manifest.name, "version": manifest.version,
                                  "task": manifest.task}
        if key_ids:
            custom["encryption"] = {"suite": SUITE_NAME, "key_ids": list(key_ids)}
        self.repo.add_target(target, stored, custom)
        record = ModelRecord(manifest.name, manifest.version, manifest.task, digest,
                             stored.stat().st_size, target, manifest.created, time.time(),
                             manifest.lineage, manifest.metrics, False, content, key_ids)
        with self._db:
            self._db.execute(
                "INSERT INTO model_versions VALUES (?,?,?,?,?,?,?,?,?,?,0,?,?)",
                (record.name, record.version, record.task, record.sha256, record.size,
                 record.target, record.created, record.pushed_at,
                 json.dumps(record.lineage), json.dumps(record.metrics), content,
                 ",".join(key_ids)))
        self.audit.append("registry.push", actor=actor, model=record.name,
                          version=record.version, sha256=digest, target=target,
                          encrypted_for=list(key_ids))
        return record

    def yank(self, name: str, version: str, *, actor: str | None = None) -> None:
        """Remove a version from the signed targets: devices will refuse it from now on."""
        rec = self.require(name, version)
        self.repo.remove_target(rec.target)
        with self._db:
            self._db.execute("UPDATE model_versions SET yanked=1 WHERE name=? AND version=?",
                             (name, version))
        self.audit.append("registry.yank", actor=actor, model=name, version=version)

    def _row(self, row: tuple[Any, ...]) -> ModelRecord:
        return ModelRecord(row[0], row[1], row[2], row[3], int(row[4]), row[5], row[6],
                           float(row[7]), json.loads(row[8]), json.loads(row[9]), bool(row[10]),
                           row[11] or row[3], tuple(k for k in row[12].split(",") if k))

    def list(self, name: str | None = None) -> list[ModelRecord]:
        """Every version (of ``name``), oldest version first."""
        q = "SELECT * FROM model_versions" + (" WHERE name=?" if name else "")
        rows = [self._row(r) for r in self._db.execute(q, (name,) if name else ())]
        return sorted(rows, key=lambda r: (r.name, version_key(r.version)))

    def get(self, name: str, version: str) -> ModelRecord | None:
        """One version, or None."""
        row = self._db.execute("SELECT * FROM model_versions WHERE name=? AND version=?",
                               (name, version)).fetchone()
        return self._row(row) if row else None

    def require(self, name: str, version: str) -> ModelRecord:
        """One version, or a :class:`UsageError` naming what exists."""
        rec = self.get(name, version)
        if rec is None:
            have = ", ".join(r.version for r in self.list(name)) or "none"
            raise UsageError(f"{name}@{version} is not in the registry (versions: {have})")
        return rec


def parse_ref(ref: str) -> tuple[str, str]:
    """``MODEL@VERSION`` -> (model, version)."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise UsageError(f"{ref!r}: expected MODEL@VERSION, e.g. digits@1.1.0")
    try:
        version_key(version)
    except ValueError:
        raise UsageError(f"{ref!r}: version must be dotted numbers") from None
    return name, version

