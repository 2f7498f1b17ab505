"""A fleet home for `edgefleet server up` tests: fleet CA, broker and registry
certificates, TUF keys, free loopback ports, broker files the broker's user can reach."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.fleet.broker import free_port
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.pki import init_certs, issue_server_cert
from tests.conftest import run_cli

__all__ = ["broker_user", "make_home", "reachable_broker_dir"]


def broker_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("mosquitto").pw_name
    except KeyError:
        return None


@pytest.fixture
def reachable_broker_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """pytest's tmp folders are closed to mosquitto's user (0700 root): as root, the
    broker's files go where that user can reach them, as `fleet init --broker-dir`."""
    if broker_user() is None:
        yield
        return
    d = Path(tempfile.mkdtemp(prefix="ef-broker-"))
    monkeypatch.setitem(_BROKER_DIR, "dir", d)
    yield
    shutil.rmtree(d, ignore_errors=True)


_BROKER_DIR: dict[str, Path | None] = {"dir": None}


def make_home(tmp: Path, *, registry: bool = True, **server: object) -> FleetHome:
    """A fleet home with the fleet CA, broker and registry certificates, TUF keys."""
    root = tmp / "home"
    server.setdefault("broker_dir", _BROKER_DIR["dir"])
    certs = root / "certs"
    init_certs(certs, ["127.0.0.1", "localhost"])
    issue_server_cert(certs, "broker", ["127.0.0.1"])
    issue_server_cert(certs, "registry", ["127.0.0.1"])
    settings: dict[str, object] = {}
    if registry:
        res = run_cli("keys", "init", "--json", env={"EDGEFLEET_HOME": str(root)})
        assert res.returncode == 0, res.stderr
        reg = free_port()
        settings = {"metadata_url": f"https://127.0.0.1:{reg}/metadata/",
                    "targets_url": f"https://127.0.0.1:{reg}/targets/",
                    "trusted_root": root / "registry/repo/metadata/1.root.json",
                    "registry_ca": certs / "ca.pem"}
    return FleetHome.create(
        root, broker_host="127.0.0.1", broker_port=free_port(), broker_ca=certs / "ca.pem",
        server={"certs": certs, "listen": "127.0.0.1", "broker_local_port": free_port(),
                "broker_user": broker_user(), "guard_interval": 1.0, **server},
        **settings)


