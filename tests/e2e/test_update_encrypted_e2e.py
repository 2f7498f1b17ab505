"""Encrypted model packages end to end, all real processes and parts: `edgefleet keys
fleet-key init` in a fleet home, the key carried by an enrollment bundle onto the device,
`edgefleet registry push --encrypt`, `edgefleet registry serve`, a real mosquitto and the
`edgefleet-agent update run` daemon requiring encryption. The encrypted package installs
and serves; a tampered (but signed) one and a plaintext one are refused with their
reasons while the device keeps its model."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.runtime.manifest import file_sha256
from edgefleet.device.wire.updates import device_topic, target_path
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.registry.repository import Registry
from edgefleet.server.rollout.fleet_view import FleetView
from tests.support.updates import make_registry, package_version, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent
ENV = {**os.environ, "COLUMNS": "300"}


def _cli(*args: str) -> str:
    res = subprocess.run([str(BIN / "edgefleet"), *args], check=False, capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _tamper_signed(registry: Path, version: str) -> None:
    """Re-sign a corrupted copy of an encrypted archive: what a broken publisher ships."""
    reg = Registry(registry, KeyRing(registry / "keys"))
    try:
        target = target_path("digits-mlp", version)
        info = reg.repo.targets().targets[target]
        data = bytearray((reg.artifacts / info.hashes["sha256"]).read_bytes())
        data[-40] ^= 0x01
        bad = reg.home / "bad.enc"
        bad.write_bytes(bytes(data))
        stored = reg.artifacts / file_sha256(bad)
        bad.replace(stored)
        reg.repo.add_target(target, stored, info.unrecognized_fields["custom"])
    finally:
        reg.close()


def test_encrypted_rollout_installs_and_refuses_tampered_and_plaintext(
        tmp_path: Path, digits_package: Path, mosquitto: Any) -> None:
    registry = tmp_path / "registry"
    make_registry(registry).close()
    root = tmp_path / "root.json"
    root.write_bytes((registry / "repo" / "metadata" / "1.root.json").read_bytes())
    home = FleetHome.create(tmp_path / "home", metadata_url="http://127.0.0.1:9/metadata/",
                            targets_url="http://127.0.0.1:9/targets/", trusted_root=root)
    key_id = json.loads(_cli("keys", "fleet-key", "init", "--home", str(home.root),
                             "--json"))["key_id"]

    # The device: enrolled after the key existed, so its bundle carries it.
    bundle = enroll_device(home, "pi-01")
    cfg = tomllib.loads(install_bundle(bundle, tmp_path / "dev").read_text())
    device_key = Path(cfg["updates"]["fleet_key"])
    assert stat.S_IMODE(device_key.stat().st_mode) == 0o600
    assert cfg["updates"]["require_encryption"] is False  # fleet.toml did not ask for it

    for v in ("1.0.0", "1.1.0"):
        out = json.loads(_cli("registry", "push", str(package_version(
            digits_package, tmp_path / "p" / v, v)), "--registry", str(registry), "--encrypt",
            "--home", str(home.root), "--json"))
        assert out["encrypted_for"] == [key_id]
    _tamper_signed(registry, "1.1.0")
    _cli("registry", "push", str(package_version(digits_package, tmp_path / "p" / "1.2.0",
                                                 "1.2.0")), "--registry", str(registry))

    server = subprocess.Popen(
        [str(BIN / "edgefleet"), "registry", "serve", "--port", "0", "--registry",
         str(registry)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    view = FleetView("127.0.0.1", mosquitto.port)
    state = tmp_path / "dev" / "update"
    agent: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split(" at ", 1)[1].split()[0]
        agent = subprocess.Popen(
            [str(BIN / "edgefleet-agent"), "update", "run", "--device", "pi-01",
             "--state", str(state), "--repo", url, "--root", str(root),
             "--fleet-key", str(device_key), "--require-encryption",
             "--broker", f"127.0.0.1:{mosquitto.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def assign(version: str) -> None:
            view.publish(device_topic("pi-01"), json.dumps(
                {"model": "digits-mlp", "version": version}).encode())

        assign("1.0.0")
        wait_for(lambda: view.states.get("pi-01", {}).get("version") == "1.0.0",
                 what="encrypted 1.0.0 activated")
        for version, reason in (("1.1.0", "decrypt_failed"), ("1.2.0", "encryption_required")):
            assign(version)
            wait_for(lambda r=reason: any(e.get("event") == "rejected" and e.get("reason") == r
                                          for e in view.events), what=f"{reason} refusal")
            refusal = next(e for e in view.events if e.get("reason") == reason)
            assert refusal["target"] == f"digits-mlp/{version}.tar"
            wait_for(lambda r=refusal: view.states["pi-01"]["ts"] > r["ts"], what="a new state")
            assert view.states["pi-01"]["version"] == "1.0.0"
            assert agent.poll() is None
        agent.terminate()
        assert agent.wait(30) == 0, agent.stderr.read() if agent.stderr else ""
        agent = None
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
        view.close()
        server.terminate()
        server.wait(10)

    # After a restart the device verifies and loads its (decrypted) slot: golden inputs pass.
    res = subprocess.run([str(BIN / "edgefleet-agent"), "update", "status", "--state",
                          str(state), "--json"], check=False, capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["verified_version"] == "1.0.0" and status["recovery"] is None
    slot = state / "slots" / status["active_slot"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in slot.rglob("*")} == {0o600}
    assert stat.S_IMODE((state / "slots").stat().st_mode) == 0o700
