"""Encrypted packages through a real loopback registry and the real updater: installed and
served; every refusal (tampered, moved, wrong key, no key, plaintext where encryption is
required) has its reason, counter and event while the current model keeps answering."""

from __future__ import annotations

import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core import errors
from edgefleet.device.runtime.envelope import FleetKey, is_encrypted
from edgefleet.device.runtime.manifest import MANIFEST_NAME, file_sha256
from edgefleet.device.wire.updates import target_path
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.registry.repository import Registry
from tests.support.updates import (
    Device,
    assert_refused,
    assign,
    golden_input,
    make_device,
    make_registry,
    package_version,
)

pytestmark = pytest.mark.timeout(180)


class Env:
    def __init__(self, reg: Registry, srv: RegistryServer, dev: Device, key: FleetKey,
                 pkgs: Path, src: Path) -> None:
        self.reg, self.srv, self.dev, self.key, self.pkgs, self.src = reg, srv, dev, key, pkgs, src

    def push(self, version: str, keys: list[FleetKey] | None = None) -> str:
        pkg = package_version(self.src, self.pkgs / version, version)
        rec = self.reg.push(pkg, encrypt_for=[k.public for k in (keys or [])] or None)
        return rec.sha256

    def refused(self, version: str, reason: str) -> None:
        assert_refused(self.dev, golden_input(self.src), version, errors.UpdateRejected, reason)


@pytest.fixture
def env(tmp_path: Path, digits_package: Path) -> Iterator[Env]:
    reg = make_registry(tmp_path / "registry")
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    key = FleetKey.generate()
    dev = make_device(tmp_path / "device", reg, srv.url)
    dev.updater.fleet_key = key
    e = Env(reg, srv, dev, key, tmp_path / "pkgs", digits_package)
    sha = e.push("1.0.0", [key])
    assert is_encrypted(reg.artifacts / sha)
    assert dev.updater.apply(assign("1.0.0")) == "activated"
    yield e
    srv.stop()
    reg.close()


def test_encrypted_package_installs_serves_and_never_leaves_the_slot(env: Env) -> None:
    stored = env.reg.artifacts / env.reg.require("digits-mlp", "1.0.0").sha256
    manifest = (env.src / MANIFEST_NAME).read_bytes()
    assert manifest[:200] not in stored.read_bytes()  # the registry holds ciphertext
    info = env.reg.repo.targets().targets[target_path("digits-mlp", "1.0.0")]
    assert info.hashes["sha256"] == file_sha256(stored)  # TUF signs the ciphertext
    assert info.unrecognized_fields["custom"]["encryption"]["key_ids"] == [
        env.key.public.key_id]
    pred = env.dev.serving.predict(golden_input(env.src))
    assert np.isfinite(pred.confidence)
    slot, _ = env.dev.updater.slots.active()
    assert slot is not None
    root = env.dev.updater.slots.path(slot)
    modes = {stat.S_IMODE(p.stat().st_mode): p for p in [root, *root.rglob("*")]}
    assert set(modes) == {0o600, 0o700}, modes
    # The plaintext manifest exists once under the device's state: in the slot.
    holders = [p for p in env.dev.state.rglob("*") if p.is_file()
               and manifest[:200] in p.read_bytes()]
    assert holders == [root / MANIFEST_NAME]
    # An update (encrypted again) and an unencrypted one both install.
    env.push("1.1.0", [env.key])
    assert env.dev.updater.apply(assign("1.1.0")) == "activated"
    env.push("1.2.0")
    assert env.dev.updater.apply(assign("1.2.0")) == "activated"


def _sign_tampered(env: Env, version: str) -> None:
    """A ciphertext TUF vouches for that does not decrypt: a broken or malicious publisher."""
    sha = env.push(version, [env.key])
    data = bytearray((env.reg.artifacts / sha).read_bytes())
    data[-40] ^= 0x01  # inside the last chunk
    bad = env.reg.home / "bad.enc"
    bad.write_bytes(bytes(data))
    stored = env.reg.artifacts / file_sha256(bad)
    shutil.move(bad, stored)
    target = target_path("digits-mlp", version)
    custom = env.reg.repo.targets().targets[target].unrecognized_fields["custom"]
    env.reg.repo.add_target(target, stored, custom)


def test_tampered_signed_ciphertext_is_refused_and_remembered(env: Env) -> None:
    _sign_tampered(env, "1.1.0")
    env.refused("1.1.0", "decrypt_failed")
    assert any(r["reason"] == "decrypt_failed"
               for r in env.dev.updater.slots.rejected().values())


def test_ciphertext_moved_to_another_version_is_refused(env: Env) -> None:
    sha = env.push("1.1.0", [env.key])
    target = target_path("digits-mlp", "1.2.0")  # 1.1.0's bytes, signed as 1.2.0
    env.reg.repo.add_target(target, env.reg.artifacts / sha, {
        "model": "digits-mlp", "version": "1.2.0", "task": "digits",
        "encryption": {"suite": "x25519-hkdf-sha256-aes256gcm",
                       "key_ids": [env.key.public.key_id]}})
    env.refused("1.2.0", "decrypt_failed")


def test_package_for_another_fleet_key_is_refused_before_download(env: Env) -> None:
    env.push("1.1.0", [FleetKey.generate()])
    env.refused("1.1.0", "wrong_fleet_key")
    assert not any("1.1.0.tar" in url for url in env.dev.updater.tuf.fetcher.received)


def test_device_without_a_fleet_key_refuses_encrypted_packages(env: Env) -> None:
    env.push("1.1.0", [env.key])
    env.dev.updater.fleet_key = None
    env.refused("1.1.0", "no_fleet_key")


def test_device_requiring_encryption_refuses_plaintext(env: Env) -> None:
    env.push("1.1.0")
    env.dev.updater.require_encryption = True
    env.refused("1.1.0", "encryption_required")
