"""The operator's registry commands as a user runs them: keys, push, ls, audit, rotation."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.core import errors
from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.server.registry.http import RegistryServer
from tests.conftest import run_cli
from tests.support.updates import package_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _ok(*args: str, env: dict[str, str] | None = None) -> Any:
    res = run_cli(*args, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_keys_push_ls_audit_and_rotation(tmp_path: Path, digits_package: Path) -> None:
    home = tmp_path / "registry"
    env = {"EDGEFLEET_REGISTRY": str(home), "EDGEFLEET_KEY_PASSPHRASE": "correct horse"}
    init = _ok("keys", "init", "--root-key", str(tmp_path / "offline" / "root.pem"), env=env)
    assert init["encrypted"] is True and set(init["keys"]) == {"root", "targets", "snapshot",
                                                               "timestamp", "director"}
    for pem in [*(home / "keys").glob("*.pem"), tmp_path / "offline" / "root.pem"]:
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        assert b"ENCRYPTED" in pem.read_bytes()
    assert not (home / "keys" / "root.pem").exists()  # root stays where it was put

    pushed = _ok("registry", "push", str(digits_package), env=env)
    assert pushed["target"] == "digits-mlp/1.0.0.tar"
    assert (home / "artifacts" / pushed["sha256"]).exists()
    listed = _ok("registry", "ls", env=env)["models"]
    assert [(m["name"], m["version"]) for m in listed] == [("digits-mlp", "1.0.0")]
    assert listed[0]["lineage"] and listed[0]["metrics"]

    # Same version with different bytes is refused; without the passphrase nothing signs.
    changed = package_version(digits_package, tmp_path / "changed", "1.0.0",
                              lambda m, _p: m.update(temperature=2.0))
    res = run_cli("registry", "push", str(changed), env=env)
    assert res.returncode == 64 and "already registered" in res.stderr
    res = run_cli("registry", "push", str(package_version(digits_package, tmp_path / "v2",
                                                          "1.1.0")),
                  env={**env, "EDGEFLEET_KEY_PASSPHRASE": ""})
    assert res.returncode == 78 and "encrypted" in res.stderr

    # A device provisioned with root v1 follows root and timestamp key rotation.
    from edgefleet.server.cli.registry_cmd import open_registry

    srv = RegistryServer(home / "repo" / "metadata", home / "artifacts").start()
    try:
        cfg = TufClientConfig(f"{srv.url}/metadata/", f"{srv.url}/targets/")
        device = TufClient(tmp_path / "device", cfg, (home / "repo/metadata/1.root.json")
                           .read_bytes())
        device.fetch("digits-mlp/1.0.0.tar", tmp_path / "device" / "v1.tar")
        old_ts = (home / "repo" / "metadata" / "timestamp.json").read_bytes()
        root_env = {**env, "EDGEFLEET_ROOT_KEY": str(tmp_path / "offline" / "root.pem")}
        assert _ok("keys", "rotate", "root", env=root_env)["root_version"] == 2
        assert _ok("keys", "rotate", "timestamp", env=root_env)["root_version"] == 3
        _ok("registry", "push", str(tmp_path / "v2"), env=env)
        device.fetch("digits-mlp/1.1.0.tar", tmp_path / "device" / "v2.tar")
        assert device.highest.versions["root"] == 3
        shown = _ok("keys", "show", env=env)
        assert shown["root_version"] == 3
        # Metadata signed with the retired timestamp key is refused.
        reg = open_registry(home)
        from securesystemslib.signer import CryptoSigner
        from tuf.api.metadata import Metadata

        retired = next((home / "keys").glob("timestamp.*.retired.pem"))
        reg.keys.passphrase = b"correct horse"
        old_signer: CryptoSigner = reg.keys.signer("timestamp", retired)
        md = Metadata.from_bytes(old_ts)
        md.signed.version = 999
        md.signatures.clear()
        md.sign(old_signer)
        (home / "repo" / "metadata" / "timestamp.json").write_bytes(md.to_bytes())
        with pytest.raises(errors.SignatureRejected):
            device.refresh()
    finally:
        srv.stop()

    # Audit: every step is logged and verifies; tampering is found.
    audit = _ok("audit", "verify", env=env)
    actions = [e["action"] for e in _ok("audit", "show", env=env)["entries"]]
    assert actions == ["registry.init", "registry.push", "keys.rotate", "keys.rotate",
                       "registry.push"]
    assert audit["entries"] == len(actions)
    log = home / "audit.jsonl"
    lines = log.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["details"]["version"] = "6.6.6"
    log.write_text("\n".join([lines[0], json.dumps(edited, sort_keys=True), *lines[2:]]) + "\n")
    res = run_cli("audit", "verify", env=env)
    assert res.returncode == 66 and "entry 2 was edited" in res.stderr
    log.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    res = run_cli("audit", "verify", env=env)
    assert res.returncode == 66 and "removed" in res.stderr
    log.write_text("\n".join(lines[:-1]) + "\n")
    res = run_cli("audit", "verify", env=env)
    assert res.returncode == 66 and "removed from the end" in res.stderr


def test_store_health_source_uses_deltas(tmp_path: Path) -> None:
    from edgefleet.server.rollout.health import StoreHealthSource
    from edgefleet.server.telemetry.store import open_store

    store = open_store(tmp_path / "fleet.db")
    with store.transaction() as st:
        st.touch_device("d1", 1.0, 1, 0)
        st.update_metrics("d1", 1.0, {"n_inferences": 100, "n_fallback": 5, "n_degraded": 0,
                                      "model_version": "1.0.0"}, {"counters": {}})
    src = StoreHealthSource(store)
    first = src.health("d1")
    assert first is not None and first.inferences == 0
    with store.transaction() as st:
        st.update_metrics("d1", 2.0, {"n_inferences": 150, "n_fallback": 35, "n_degraded": 5,
                                      "model_version": "1.1.0"},
                          {"counters": {"inference_errors": 2}})
    h = src.health("d1")
    assert h is not None and (h.version, h.inferences, h.fallback, h.degraded, h.errors) == (
        "1.1.0", 50, 30, 5, 2)
    assert abs(h.bad_rate() - 37 / 50) < 1e-9
    assert src.health("nope") is None


def test_registry_serve_command(tmp_path: Path, digits_package: Path) -> None:
    import subprocess

    from tests.conftest import BIN
    from tests.support.updates import make_registry

    reg = make_registry(tmp_path / "registry")
    reg.push(digits_package)
    reg.close()
    proc = subprocess.Popen([str(BIN / "edgefleet"), "registry", "serve", "--port", "0",
                             "--registry", str(tmp_path / "registry")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" at ", 1)[1].split()[0]
        root = (tmp_path / "registry" / "repo" / "metadata" / "1.root.json").read_bytes()
        device = TufClient(tmp_path / "dev", TufClientConfig(f"{url}/metadata/",
                                                             f"{url}/targets/"), root)
        info = device.fetch("digits-mlp/1.0.0.tar", tmp_path / "dev" / "p.tar")
        assert info.length == (tmp_path / "dev" / "p.tar").stat().st_size
    finally:
        proc.terminate()
        proc.wait(10)
