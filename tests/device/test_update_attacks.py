"""The update attack matrix against a real loopback TUF registry: each is refused, with an
event, while the old model keeps answering every request."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgefleet.device.core import errors
from edgefleet.device.runtime.manifest import MANIFEST_NAME, file_sha256
from edgefleet.device.updates.installer import HealthPolicy
from edgefleet.device.wire.updates import target_path
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.registry.repository import Registry
from edgefleet.server.registry.tuf_repo import Expiry
from tests.support.updates import (
    Device,
    Mode,
    Traffic,
    assert_refused,
    assign,
    faulty_server,
    flip_bytes,
    golden_input,
    make_device,
    make_registry,
    package_version,
    rehash,
)

pytestmark = pytest.mark.timeout(120)


class Env:
    def __init__(self, reg: Registry, srv: RegistryServer, mode: Mode, dev: Device,
                 pkgs: Path, src: Path) -> None:
        self.reg, self.srv, self.mode, self.dev = reg, srv, mode, dev
        self.pkgs, self.src = pkgs, src

    def push(self, version: str, edit=None) -> str:  # type: ignore[no-untyped-def]
        pkg = package_version(self.src, self.pkgs / version, version, edit)
        return self.reg.push(pkg).sha256

    def sample(self) -> np.ndarray:
        return golden_input(self.src)

    def refused(self, version: str, exc_type: type[Exception], reason: str) -> Exception:
        return assert_refused(self.dev, self.sample(), version, exc_type, reason)


def _env(tmp_path: Path, digits_package: Path, *, socket_timeout_s: float = 5.0,
         expiry: Expiry | None = None, variant: str | None = None) -> Iterator[Env]:
    reg = make_registry(tmp_path / "registry", expiry)
    srv, mode = faulty_server(reg)
    pkgs = tmp_path / "pkgs"
    env = Env(reg, srv, mode, None, pkgs, digits_package)  # type: ignore[arg-type]
    env.push("1.0.0")
    env.dev = make_device(tmp_path / "device", reg, srv.url, socket_timeout_s=socket_timeout_s,
                          health=HealthPolicy(probe_inferences=10))
    env.dev.updater.variant = variant
    assert env.dev.updater.apply(assign("1.0.0")) == "activated"
    yield env
    srv.stop()
    reg.close()


@pytest.fixture
def env(tmp_path: Path, digits_package: Path) -> Iterator[Env]:
    yield from _env(tmp_path, digits_package)


def test_good_update_activates_and_persists_highest_seen(env: Env) -> None:
    env.push("1.1.0")
    with Traffic(env.dev.serving, env.sample()) as traffic:
        assert env.dev.updater.apply(assign("1.1.0")) == "activated"
    assert traffic.failed == 0
    assert env.dev.serving.active is not None
    assert env.dev.serving.active.manifest.version == "1.1.0"
    assert env.dev.events[-1][0] == "activated"
    saved = json.loads((env.dev.state / "highest_seen.json").read_text())
    assert saved["targets"] >= 3 and saved["timestamp"] >= 3
    assert env.dev.updater.apply(assign("1.1.0")) == "current"


def test_tampered_archive_is_refused(env: Env) -> None:
    sha = env.push("1.1.0")
    flip_bytes(env.reg.artifacts / sha, offset_from_end=4000)
    env.refused("1.1.0", errors.TargetMismatch, "hash_mismatch")


def test_target_not_signed_is_refused(env: Env) -> None:
    env.refused("9.9.9", errors.TargetNotSigned, "not_signed")


def test_metadata_signed_by_unknown_key_is_refused(env: Env) -> None:
    env.push("1.1.0")
    ts_path = env.reg.repo.metadata_dir / "timestamp.json"
    md = Metadata.from_bytes(ts_path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    ts_path.write_bytes(md.to_bytes())
    env.refused("1.1.0", errors.SignatureRejected, "bad_signature")


def test_older_metadata_is_refused_even_after_cache_loss(env: Env) -> None:
    old_ts = (env.reg.repo.metadata_dir / "timestamp.json").read_bytes()
    env.push("1.1.0")
    env.dev.updater.tuf.refresh()  # the device sees the newer state
    (env.reg.repo.metadata_dir / "timestamp.json").write_bytes(old_ts)  # replay the old one
    env.refused("1.1.0", errors.RollbackRejected, "rollback")
    # Losing ngclient's cache must not reopen the door: our own floor still holds.
    shutil.rmtree(env.dev.state / "tuf")
    env.refused("1.1.0", errors.RollbackRejected, "rollback")


def test_mix_and_match_metadata_is_refused(env: Env) -> None:
    env.push("1.1.0")
    md_dir = env.reg.repo.metadata_dir
    newest = max(int(p.name.split(".")[0]) for p in md_dir.glob("*.targets.json"))
    (md_dir / f"{newest}.targets.json").write_bytes(
        (md_dir / f"{newest - 1}.targets.json").read_bytes())
    env.refused("1.1.0", errors.MixAndMatchRejected, "mix_and_match")


def test_truncated_download_is_refused(env: Env) -> None:
    env.push("1.1.0")
    env.mode.match, env.mode.kind = "/targets/", "truncate"
    env.refused("1.1.0", errors.DownloadTruncated, "truncated")


def test_response_longer_than_signed_length_is_refused(env: Env) -> None:
    env.push("1.1.0")
    env.mode.match, env.mode.kind = "/targets/", "extra"
    env.refused("1.1.0", errors.DownloadTooLarge, "too_large")


@pytest.mark.slow
def test_slow_retrieval_is_abandoned(tmp_path: Path, digits_package: Path) -> None:
    for env in _env(tmp_path, digits_package, socket_timeout_s=0.5):
        env.push("1.1.0")
        env.mode.match, env.mode.kind = "/targets/", "drip"
        env.refused("1.1.0", errors.SlowRetrieval, "slow_retrieval")


def test_expired_metadata_is_refused(tmp_path: Path, digits_package: Path) -> None:
    for env in _env(tmp_path, digits_package):
        env.push("1.1.0")
        env.reg.repo.expiry.days["timestamp"] = -1.0  # the repository stopped re-signing
        env.reg.repo.refresh_timestamp()
        env.refused("1.1.0", errors.MetadataExpired, "expired")


def _sign_raw(reg: Registry, name: str, version: str, files: dict[str, bytes]) -> None:
    """What a careless or compromised signer could publish: any tar, validly signed."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    staged = reg.home / "raw.tar"
    staged.write_bytes(buf.getvalue())
    sha = file_sha256(staged)
    staged.replace(reg.artifacts / sha)
    reg.repo.add_target(target_path(name, version), reg.artifacts / sha,
                        {"model": name, "version": version, "task": "digits"})


def test_manifest_naming_a_file_outside_the_package_is_refused(env: Env) -> None:
    m = json.loads((env.src / MANIFEST_NAME).read_text())
    m["version"] = "1.1.0"
    secret = b"not part of any package"
    m["files"]["../outside.bin"] = {"sha256": file_sha256_bytes(secret), "size": len(secret)}
    files = {MANIFEST_NAME: json.dumps(m).encode()}
    files.update({rel: (env.src / rel).read_bytes() for rel in m["files"] if ".." not in rel})
    _sign_raw(env.reg, "digits-mlp", "1.1.0", files)
    err = env.refused("1.1.0", errors.PackageError, "package_invalid")
    assert "outside the package" in str(err)


def test_archive_member_escaping_the_folder_is_refused(env: Env) -> None:
    _sign_raw(env.reg, "digits-mlp", "1.1.0", {"../../evil.txt": b"x"})
    env.refused("1.1.0", errors.PackageError, "package_invalid")
    assert not (env.dev.state / "evil.txt").exists()


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _perturb_onnx(manifest: dict, pkg: Path) -> None:  # type: ignore[type-arg]
    import onnx
    from onnx import numpy_helper

    path = pkg / manifest["variants"]["onnx-int8"]["file"]
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(biggest)
    new = numpy_helper.from_array((-arr.astype(np.int64)).clip(-127, 127).astype(arr.dtype),
                                  biggest.name)
    biggest.CopyFrom(new)
    onnx.save(model, str(path))


def test_signed_but_mutated_onnx_fails_the_sandboxed_trial(env: Env) -> None:
    env.push("1.1.0", _perturb_onnx)
    err = env.refused("1.1.0", errors.ModelRejected, "trial_failed")
    assert "trial" in str(err)
    # Remembered: the same archive is not fetched and tried again.
    env.refused("1.1.0", errors.UpdateRejected, "previously_rejected")


def _mutate_tflite(manifest: dict, pkg: Path) -> None:  # type: ignore[type-arg]
    path = pkg / manifest["variants"]["tflite-int8"]["file"]
    flip_bytes(path, offset_from_end=path.stat().st_size // 2, count=256)


def test_signed_but_mutated_tflite_fails_the_sandboxed_trial(tmp_path: Path,
                                                            digits_package: Path) -> None:
    for env in _env(tmp_path, digits_package, variant="tflite-int8"):
        env.push("1.1.0", _mutate_tflite)
        err = env.refused("1.1.0", errors.ModelRejected, "trial_failed")
        assert "trial" in str(err)


def test_rehash_helper_keeps_packages_valid(tmp_path: Path, digits_package: Path) -> None:
    from edgefleet.device.runtime.manifest import load_package

    pkg = package_version(digits_package, tmp_path / "p", "3.0.0")
    rehash(pkg)
    assert load_package(pkg).version == "3.0.0"


def test_expiry_is_whole_seconds() -> None:
    assert Expiry().of("timestamp").microsecond == 0
    assert Expiry().of("timestamp") > datetime.now(UTC) + timedelta(hours=23)
