"""The fleet home: the server's state folder, and device enrollment and revocation.

Layout (all private: the folder is 0700, secrets 0600)::

    fleet.toml            broker, SuperLink and registry addresses (FleetSettings)
    devices.db            enrolled devices (server/fleet/devices.py): hashes, never passwords
    services/<role>.password   broker credentials of the ingest, scorer and operator
    broker/passwd, broker/acl  generated for mosquitto from the two above
    nodes/<device>.pub    SuperNode public keys (the private key leaves only in the bundle)
    bundles/<device>/     default output of ``edgefleet devices enroll``
    flwr/                 the ``flwr`` CLI's config for reaching the SuperLink

Default location: ``$EDGEFLEET_HOME``, else ``$XDG_DATA_HOME/edgefleet``, else
``~/.local/share/edgefleet`` (next to the default telemetry store).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, model_validator

from edgefleet.device.core.config import StrictModel, dump_toml, load_config, registry_is_https
from edgefleet.device.core.errors import ConfigError, UsageError
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN
from edgefleet.server.fleet.broker_acl import (
    RESERVED_NAMES,
    hash_password,
    write_acl,
    write_password_hashes,
)
from edgefleet.server.fleet.devices import DeviceRow, DeviceTable

if TYPE_CHECKING:
    from edgefleet.server.fl.runner import SuperLinkConn
    from edgefleet.server.fleet.broker import MosquittoBroker

__all__ = ["SERVICE_ROLES", "BrokerFiles", "Credentials", "FleetHome", "FleetSettings",
           "enroll_device", "register_pending", "revoke_device"]

log = logging.getLogger(__name__)

#: Service accounts on the broker; the user name is the role (see ROLE_RULES).
SERVICE_ROLES = ("ingest", "scorer", "operator")
_HOST_PORT = r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$"


class FleetSettings(StrictModel):
    """``fleet.toml``: what every enrollment bundle tells its device."""

    broker_host: str = "127.0.0.1"
    broker_port: int = Field(default=1883, ge=1, le=65535)
    broker_ca: Path | None = Field(default=None, description="CA of the broker's TLS cert.")
    broker_pid_file: Path | None = Field(
        default=None, description="mosquitto's pid file: enroll/revoke send it SIGHUP.")
    superlink: str | None = Field(default=None, pattern=_HOST_PORT,
                                  description="SuperLink address devices dial (host:port).")
    superlink_control: str | None = Field(
        default=None, pattern=_HOST_PORT,
        description="Where the flwr CLI reaches it (default: superlink).")
    superlink_ca: Path | None = None
    metadata_url: str = ""
    targets_url: str = ""
    trusted_root: Path | None = Field(default=None, description="TUF root.json devices pin.")
    registry_ca: Path | None = Field(
        default=None, description="CA of the registry's HTTPS certificate (usually the "
                                  "fleet CA of `edgefleet certs init`).")

    @model_validator(mode="after")
    def _complete(self) -> FleetSettings:
        if self.superlink and self.superlink_ca is None:
            raise ValueError("superlink needs superlink_ca (devices use TLS)")
        if self.metadata_url and self.trusted_root is None:
            raise ValueError("metadata_url needs trusted_root (the root.json devices pin)")
        https = registry_is_https(self.metadata_url, self.targets_url)
        if self.registry_ca is not None and not https:
            raise ValueError("registry_ca needs https:// registry URLs")
        return self


@dataclass(frozen=True)
class Credentials:
    """A broker account of a service."""

    username: str
    password: str


@dataclass(frozen=True)
class BrokerFiles:
    """What to give mosquitto as ``password_file`` and ``acl_file``."""

    password_file: Path
    acl_file: Path


def default_root() -> Path:
    """``$EDGEFLEET_HOME``, else ``$XDG_DATA_HOME/edgefleet``, else ``~/.local/share/...``."""
    env = os.environ.get("EDGEFLEET_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefleet"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


class FleetHome:
    """One fleet's server-side state (see the module docstring for the layout)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        if not self.config_path.is_file():
            raise UsageError(f"no fleet home at {self.root} (run `edgefleet fleet init`)")
        self.settings = load_config(FleetSettings, [self.config_path])
        self.devices = DeviceTable(self.root / "devices.db")

    @property
    def config_path(self) -> Path:
        """``fleet.toml``."""
        return self.root / "fleet.toml"

    @classmethod
    def create(cls, root: Path | None = None, *, update: bool = False,
               **settings: Any) -> FleetHome:
        """Write ``fleet.toml`` (absolute paths), service accounts and broker files.

        An existing home is refused unless ``update`` (then settings are replaced and
        devices and service passwords kept).
        """
        root = Path(root) if root is not None else default_root()
        if (root / "fleet.toml").exists() and not update:
            raise UsageError(f"{root} already holds a fleet (pass --update to change it)")
        for key in ("broker_ca", "broker_pid_file", "superlink_ca", "trusted_root",
                    "registry_ca"):
            if settings.get(key) is not None:
                settings[key] = Path(settings[key]).resolve()
        try:
            cfg = FleetSettings.model_validate(settings)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise UsageError(f"{where + ': ' if where else ''}"
                             f"{str(err['msg']).removeprefix('Value error, ')}") from None
        for path in (cfg.broker_ca, cfg.superlink_ca, cfg.trusted_root, cfg.registry_ca):
            if path is not None and not path.is_file():
                raise ConfigError("file not found", path=str(path))
        _private_dir(root)
        (root / "fleet.toml").write_text(dump_toml(cfg.model_dump(mode="json")))
        for sub in ("services", "broker", "nodes", "bundles"):
            _private_dir(root / sub)
        home = cls(root)
        for role in SERVICE_ROLES:
            home.service_credentials(role)
        home.broker_files()
        return home

    def service_credentials(self, role: str) -> Credentials:
        """The broker account of ``role`` (created with a random password on first use)."""
        if role not in SERVICE_ROLES:
            raise UsageError(f"unknown service {role!r} (one of {', '.join(SERVICE_ROLES)})")
        path = _private_dir(self.root / "services") / f"{role}.password"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24) + "\n")
        return Credentials(role, path.read_text(encoding="utf-8").strip())

    def broker_files(self) -> BrokerFiles:
        """(Re)write the password and ACL files from services and active devices."""
        active = self.devices.active()
        hashes = {r.mqtt_username: r.mqtt_hash for r in active}
        hashes.update({role: hash_password(self.service_credentials(role).password)
                       for role in SERVICE_ROLES})
        d = _private_dir(self.root / "broker")
        pw = write_password_hashes(d / "passwd", hashes)
        acl = write_acl(d / "acl", services=(), roles={r: r for r in SERVICE_ROLES},
                        groups={r.mqtt_username: r.group for r in active})
        return BrokerFiles(pw, acl)

    def superlink_conn(self) -> SuperLinkConn | None:
        """How the ``flwr`` CLI reaches the configured SuperLink (None when none is)."""
        from edgefleet.server.fl.runner import SuperLinkConn

        s = self.settings
        if not s.superlink:
            return None
        return SuperLinkConn(s.superlink_control or s.superlink, self.root / "flwr",
                             s.superlink_ca)

    def reload_broker(self, broker: MosquittoBroker | None = None) -> bool:
        """SIGHUP the broker so new files apply (and revoked clients are disconnected)."""
        if broker is not None:
            broker.reload()
            return True
        pid_file = self.settings.broker_pid_file
        if pid_file is None or not pid_file.is_file():
            log.warning("broker files changed; reload mosquitto (SIGHUP) to apply them")
            return False
        os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
        return True


def check_device_name(name: str, group: str) -> None:
    """Refuse names the ACL could confuse with a service or a topic level."""
    for what, value in (("device name", name), ("group", group)):
        if not re.match(DEVICE_ID_PATTERN, value):
            raise UsageError(f"{value!r} is not a valid {what} (letters, digits, '.', '_', "
                             "'-'; at most 64)")
    if name in RESERVED_NAMES or name in SERVICE_ROLES:
        raise UsageError(f"{name!r} is reserved for the services; pick another device name")


def _flwr_json(conn: SuperLinkConn, what: str, *args: str) -> dict[str, Any]:
    from edgefleet.server.fl.runner import CONN, FlRunError

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


def enroll_device(home: FleetHome, name: str, group: str = "default", *,
                  out: Path | None = None, superlink: SuperLinkConn | None = None,
                  broker: MosquittoBroker | None = None) -> Path:
    """Create a device's credentials and keys and write its bundle; returns the bundle path.

    With ``superlink`` the node key is registered now, otherwise it is recorded as
    pending for :func:`register_pending`. The broker files are rewritten; pass
    ``broker`` (or set ``broker_pid_file``) so the broker reloads them.
    """
    from edgefleet.server.fleet.enroll_bundle import write_bundle
    from edgefleet.server.fleet.pki import make_node_key

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
            node_pub = _private_dir(home.root / "nodes") / f"{name}.pub"
            node_pub.write_bytes((stage / "node.pub").read_bytes())
        row = home.devices.put(name, group, hash_password(password),
                               str(node_pub) if node_pub else None,
                               "pending" if node_pub else "none")
        try:
            if node_pub is not None and superlink is not None:
                _register(home, row, superlink)
            bundle = write_bundle(home.settings, name, group, password, stage, out)
        except BaseException:
            home.devices.delete(name)  # no half-enrolled device blocking the name
            raise
        home.broker_files()
        home.reload_broker(broker)
    log.info("enrolled %s (group %s): bundle %s", name, group, bundle)
    return bundle


def revoke_device(home: FleetHome, name: str, *, broker: MosquittoBroker | None = None,
                  superlink: SuperLinkConn | None = None) -> None:
    """Cut a device off: broker account removed (and reloaded), SuperNode unregistered."""
    row = home.devices.get(name)
    if row is None:
        raise UsageError(f"unknown device {name!r} (see `edgefleet devices ls`)")
    home.devices.revoke(name)
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
