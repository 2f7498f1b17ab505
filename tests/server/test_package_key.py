"""The fleet's package-encryption key: made at run time, rotated with both keys as
recipients until the rotation is finished, carried to devices only by their bundle."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.envelope import FleetKey
from edgefleet.server.fleet import package_key
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome


def _home(tmp_path: Path, **extra: object) -> FleetHome:
    root = tmp_path / "root.json"
    root.write_text('{"signed": {}}')
    return FleetHome.create(tmp_path / "home", metadata_url="http://127.0.0.1:9/metadata/",
                            targets_url="http://127.0.0.1:9/targets/", trusted_root=root,
                            **extra)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_create_rotate_finish(tmp_path: Path) -> None:
    home = _home(tmp_path)
    assert package_key.load(home.root) is None
    first = package_key.create(home.root)
    assert _mode(package_key.private_path(home.root)) == 0o600
    assert _mode(home.root / package_key.KEY_DIR) == 0o700
    with pytest.raises(UsageError, match="rotate"):
        package_key.create(home.root)
    old, second = package_key.rotate(home.root)
    assert old == first.public and second.public != first.public
    assert [k.key_id for k in package_key.publish_keys(home.root)] == [
        second.public.key_id, first.public.key_id]
    retired = home.root / package_key.KEY_DIR / f"fleet.{first.public.key_id}.retired.key"
    assert _mode(retired) == 0o600 and FleetKey.load(retired).public == first.public
    assert package_key.finish_rotation(home.root) == first.public
    assert package_key.publish_keys(home.root) == [second.public]
    assert package_key.finish_rotation(home.root) is None


def test_bundle_carries_the_key_only_when_the_fleet_has_one(tmp_path: Path) -> None:
    home = _home(tmp_path, encrypt_models=True)
    cfg = tomllib.loads(install_bundle(enroll_device(home, "pi-01"), tmp_path / "d1").read_text())
    assert "fleet_key" not in cfg["updates"]
    key = package_key.create(home.root)
    cfg = tomllib.loads(install_bundle(enroll_device(home, "pi-02"), tmp_path / "d2").read_text())
    installed = Path(cfg["updates"]["fleet_key"])
    assert installed.parent == (tmp_path / "d2" / "keys").resolve()
    assert _mode(installed) == 0o600 and FleetKey.load(installed).public == key.public
    assert cfg["updates"]["require_encryption"] is True  # encrypt_models in fleet.toml
    assert _mode(home.root / "bundles" / "pi-02" / "fleet.key") == 0o600


def test_key_commands_land_in_the_audit_log(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app
    from edgefleet.server.fleet.audit import AuditLog

    home = _home(tmp_path)
    runner = CliRunner()
    for args in (["init"], ["rotate"], ["finish-rotation"]):
        res = runner.invoke(app, ["keys", "fleet-key", *args, "--home", str(home.root)])
        assert res.exit_code == 0, res.output
    log = AuditLog(home.registry_path / "audit.jsonl")
    entries = log.entries()
    assert [e["action"] for e in entries] == [
        "keys.fleet_key.init", "keys.fleet_key.rotate", "keys.fleet_key.finish_rotation"]
    assert entries[1]["details"]["old"] == entries[0]["details"]["key_id"]
    assert entries[2]["details"]["retired"] == entries[0]["details"]["key_id"]
    assert log.verify().entries == 3
