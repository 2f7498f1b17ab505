"""Enrolling and revoking devices: credentials, node keys, bundles, SuperLink registration.

A device is enrolled into a :class:`~edgefleet.server.fleet.home.FleetHome`: its broker
account and ACL entry, its SuperNode key (registered with the SuperLink now, or left
pending for ``edgefleet devices sync``) and its bundle (:mod:`.enroll_bundle`).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.device.core.errors import UsageError
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN
from edgefleet.server.fleet import package_key
from edgefleet.server.fleet.app_signing import fleet_key
from edgefleet.server.fleet.broker_acl import RESERVED_NAMES, hash_password
from edgefleet.server.fleet.devices import DeviceRow
from edgefleet.server.fleet.director_key import public_file
from edgefleet.server.fleet.enroll_bundle import write_bundle
from edgefleet.server.fleet.home import SERVICE_ROLES, FleetHome, private_dir
from edgefleet.server.fleet.pki import issue_client_cert, make_node_key
from edgefleet.server.fleet.superlink import CONN, FlRunError, SuperLinkConn

if TYPE_CHECKING:
    from edgefleet.server.fleet.broker import MosquittoBroker

__all__ = ["check_device_name", "enroll_device", "register_pending", "revoke_device"]

log = logging.getLogger(__name__)


def check_device_name(name: str, group: str) -> None:
    """Refuse names the ACL could confuse with a service or a topic level."""
    for what, value in (("device name", name), ("group", group)):
        if not re.fullmatch(DEVICE_ID_PATTERN, value):
            raise UsageError(f"{value!r} is not a valid {what} (letters, digits, '.', '_', "
                             "'-'; at most 64)")
    if name in RESERVED_NAMES or name in SERVICE_ROLES:
        raise UsageError(f"{name!r} is reserved for the services; pick another device name")


def _flwr_json(conn: SuperLinkConn, what: str, *args: str) -> dict[str, Any]:
    res = conn.flwr("supernode", *args, CONN, "--format", "json")
    try:
        out: dict[str, Any] = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        out = {}
    if res.returncode or not out.get("success"):
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise FlRunError(f"{what} failed: {msg[-1] if msg else res.returncode}")
    return out


def _register(home: FleetHome, row: DeviceRow, conn: SuperLinkConn) -> None:
    assert row.node_public_key is not None
    out = _flwr_json(conn, f"registering {row.name}'s SuperNode key", "register",
                     row.node_public_key, "--name", row.name)
    home.devices.set_fl(row.name, "registered", int(out["node-id"]))


def _unregister(home: FleetHome, row: DeviceRow, conn: SuperLinkConn) -> None:
    if row.node_id is not None:
        _flwr_json(conn, f"unregistering {row.name}'s SuperNode", "unregister", str(row.node_id))
    home.devices.set_fl(row.name, "unregistered")


def _registry_client_cert(home: FleetHome, name: str, stage: Path) -> None:
    """The device's registry client certificate (fleet CA) into ``stage``; the server
    keeps the public half in ``device-certs/`` for the registry's allow-list."""
    if not home.settings.server.registry_client_auth:
        return
    certs = home.settings.server.certs
    if certs is None or not (certs / "ca.key").is_file():
        raise UsageError("[server] registry_client_auth needs the fleet CA ([server] certs "
                         "with ca.pem and ca.key: `edgefleet certs init`)")
    issue_client_cert(certs, name, stage / "registry-client.pem", stage / "registry-client.key")
    dest = private_dir(home.device_certs_dir) / f"{name}.pem"
    dest.write_bytes((stage / "registry-client.pem").read_bytes())


def enroll_device(home: FleetHome, name: str, group: str = "default", *,
                  out: Path | None = None, superlink: SuperLinkConn | None = None,
                  broker: MosquittoBroker | None = None) -> Path:
    """Create a device's credentials and keys and write its bundle; returns the bundle path.

    With ``superlink`` the node key is registered now, otherwise it is recorded as
    pending for :func:`register_pending`. The broker files are rewritten; pass
    ``broker`` (or set ``broker_pid_file``) so the broker reloads them.
    """
    check_device_name(name, group)
    existing = home.devices.get(name)
    if existing is not None and existing.active:
        raise UsageError(f"{name!r} is already enrolled (revoke it first to re-enroll)")
    out = Path(out) if out is not None else home.root / "bundles" / name
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UsageError(f"{out} exists; refusing to overwrite a bundle")
    password = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix=f".enroll-{name}-", dir=home.root) as tmp:
        stage = Path(tmp)
        node_pub: Path | None = None
        if home.settings.superlink:
            make_node_key(stage / "node.key")
            node_pub = private_dir(home.root / "nodes") / f"{name}.pub"
            node_pub.write_bytes((stage / "node.pub").read_bytes())
        row = home.devices.put(name, group, hash_password(password),
                               str(node_pub) if node_pub else None,
                               "pending" if node_pub else "none")
        try:
            if node_pub is not None and superlink is not None:
                _register(home, row, superlink)
            pkey = package_key.private_path(home.root)
            _registry_client_cert(home, name, stage)
            director = public_file(home.registry_path / "keys")
            if home.settings.metadata_url and not director.is_file():
                log.warning("%s: no director key at %s; %s will follow unsigned assignments "
                            "(set [server] registry, or run `edgefleet fleet init --update`)",
                            name, director, name)
            bundle = write_bundle(home.settings, name, group, password, stage, out,
                                  fleet_key(home.root).trusted_entities(),
                                  pkey if pkey.exists() else None,
                                  director if director.is_file() else None)
        except BaseException:
            home.devices.delete(name)  # no half-enrolled device blocking the name
            raise
        if home.settings.server.registry_client_auth:
            home.registry_clients()
        home.broker_files()
        home.reload_broker(broker)
    log.info("enrolled %s (group %s): bundle %s", name, group, bundle)
    return bundle


def revoke_device(home: FleetHome, name: str, *, broker: MosquittoBroker | None = None,
                  superlink: SuperLinkConn | None = None) -> None:
    """Cut a device off: broker account removed (and reloaded), SuperNode unregistered,
    its certificate off the registry's allow-list (downloads stop at once)."""
    row = home.devices.get(name)
    if row is None:
        raise UsageError(f"unknown device {name!r} (see `edgefleet devices ls`)")
    home.devices.revoke(name)
    if home.settings.server.registry_client_auth or home.registry_clients_file.exists():
        home.registry_clients()  # its certificate leaves the registry's allow-list
    home.broker_files()
    home.reload_broker(broker)
    if row.fl_state == "pending" or (row.fl_state == "registered" and row.node_id is None):
        home.devices.set_fl(name, "unregistered")  # the SuperLink never knew it
    elif row.fl_state in ("registered", "unregister_pending"):
        if superlink is None:
            home.devices.set_fl(name, "unregister_pending")
            log.warning("%s: SuperNode still registered; run `edgefleet devices sync`", name)
        else:
            _unregister(home, row, superlink)
    log.info("revoked %s", name)


def register_pending(home: FleetHome, superlink: SuperLinkConn) -> list[str]:
    """Register pending keys of active devices, unregister those of revoked ones."""
    done = []
    for row in home.devices.all():
        if row.active and row.fl_state == "pending":
            _register(home, row, superlink)
            done.append(row.name)
        elif not row.active and row.fl_state == "unregister_pending":
            _unregister(home, row, superlink)
            done.append(row.name)
    return done
