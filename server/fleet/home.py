"""The fleet home: the server's state folder (enrollment is :mod:`.enrollment`).

Layout (all private: the folder is 0700, secrets 0600)::

    fleet.toml            broker, SuperLink and registry addresses (FleetSettings)
    devices.db            enrolled devices (server/fleet/devices.py): hashes, never passwords
    services/<role>.password   broker credentials of the ingest, scorer and operator
    broker/passwd, broker/acl  generated for mosquitto from the two above
    nodes/<device>.pub    SuperNode public keys (the private key leaves only in the bundle)
    app-signing/app.key   signs every Flower app run on the fleet (app.pub: what devices trust)
    package-key/          the package-encryption key (optional, server/fleet/package_key.py)
    bundles/<device>/     default output of ``edgefleet devices enroll``
    flwr/                 the ``flwr`` CLI's config for reaching the SuperLink
    registry/             the model registry (``[server] registry`` moves it)
    fleet.db              the telemetry store (``[server] store`` moves it)
    superlink.db          the SuperLink's runs and node keys (``edgefleet server up``)
    fl/                   federated runs (``edgefleet train``'s work folder)
    logs/<service>.log    every service ``edgefleet server up`` runs
    run/                  ``server up``'s pid and status files

Every service and command finds its endpoints, credentials and stores here (``--home``,
``$EDGEFLEET_HOME``); flags override; secrets are read from files, never passed on a
command line.

Default location: ``$EDGEFLEET_HOME``, else ``$XDG_DATA_HOME/edgefleet``, else
``~/.local/share/edgefleet`` (next to the default telemetry store).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from edgefleet.device.core.config import StrictModel, dump_toml, load_config, registry_is_https
from edgefleet.device.core.durable import atomic_write_bytes
from edgefleet.device.core.errors import ConfigError, UsageError
from edgefleet.server.fleet.broker_acl import (
    hash_password,
    write_acl,
    write_password_hashes,
)
from edgefleet.server.fleet.devices import DeviceTable
from edgefleet.server.fleet.pki import cert_fingerprint
from edgefleet.server.fleet.superlink import SuperLinkConn

if TYPE_CHECKING:
    from edgefleet.device.core.mqtt_link import MqttConfig
    from edgefleet.server.fleet.broker import MosquittoBroker

__all__ = ["SERVICE_ROLES", "BrokerFiles", "Credentials", "FleetHome", "FleetSettings",
           "ServerSettings", "find_home", "private_dir"]

log = logging.getLogger(__name__)

#: Service accounts on the broker; the user name is the role (see ROLE_RULES).
SERVICE_ROLES = ("ingest", "scorer", "operator")
_HOST_PORT = r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$"


class ServerSettings(StrictModel):
    """``[server]`` of ``fleet.toml``: what ``edgefleet server up`` runs, where stores are."""

    listen: str = Field(default="0.0.0.0", description="Address the device-facing "
                        "listeners (broker, SuperLink, registry) bind to.")
    broker_local_port: int = Field(default=1884, ge=1, le=65535, description=(
        "The broker's loopback listener (127.0.0.1, no TLS) the fleet's services use."))
    broker_user: str | None = Field(default=None, description=(
        "When the server runs as root, mosquitto drops to this user; the home hands it "
        "the broker's files (Debian: mosquitto)."))
    broker_dir: Path | None = Field(default=None, description=(
        "The broker's files: password file, ACL, config, TLS copies, persistence "
        "[default: <home>/broker]. Must be reachable by broker_user."))
    certs: Path | None = Field(default=None, description=(
        "Folder of `edgefleet certs init`: ca.pem, server.pem/.key (SuperLink), "
        "registry.pem/.key and broker.pem/.key (`edgefleet certs issue`)."))
    registry: Path | None = Field(default=None, description="Registry folder "
                                  "[default: <home>/registry].")
    registry_client_auth: bool = Field(default=False, description=(
        "The registry serves only enrolled devices: each presents the client certificate "
        "its bundle holds (mutual TLS, fleet CA); revoking a device stops its downloads. "
        "Needs https:// registry URLs and certs."))
    store: str | None = Field(default=None, description="Fleet store: SQLite path or "
                              "postgresql:// DSN [default: <home>/fleet.db].")
    scorer_package: Path | None = Field(default=None, description=(
        "Cloud model package the scorer serves (no scorer without it)."))
    guard_interval: float = Field(default=10.0, gt=0)
    metrics_port: int | None = Field(default=None, ge=1, le=65529, description=(
        "Prometheus /metrics on loopback (127.0.0.1), off when unset: the fleet gauges "
        "(`metrics serve`) on this port, then ingest, scorer, registry, rollout guard and "
        "dashboard on the next five (docs/operations.md)."))
    dashboard_port: int | None = Field(default=None, ge=1, le=65535, description=(
        "`edgefleet dashboard serve` on 127.0.0.1 at this port, off when unset (put a TLS "
        "proxy in front to reach it from elsewhere); needs a dashboard user."))
    dashboard_trusted_proxies: list[str] = Field(default_factory=list, max_length=64,
                                                 description=(
        "Reverse proxies (addresses or networks, e.g. [\"127.0.0.1\"]) whose "
        "X-Forwarded-For names the dashboard's client for the sign-in limit and the audit "
        "log; none by default: the peer address is the client."))
    max_restarts: int = Field(default=5, ge=0, description=(
        "Restart budget of each service: at most this many restarts ..."))
    restart_window_s: float = Field(default=60.0, gt=0, description="... within this window.")

    @field_validator("dashboard_trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for v in value:
            try:
                ipaddress.ip_network(v.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or network") from None
        return value


class FleetSettings(StrictModel):
    """``fleet.toml``: what every enrollment bundle tells its device (``[server]``: what
    the server runs)."""

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
    encrypt_models: bool = Field(default=False, description=(
        "Every `registry push` encrypts for the fleet key (`keys fleet-key init`), and "
        "bundles tell devices to refuse unencrypted packages (require_encryption)."))
    server: ServerSettings = Field(default_factory=ServerSettings)

    @model_validator(mode="after")
    def _complete(self) -> FleetSettings:
        if self.superlink and self.superlink_ca is None:
            raise ValueError("superlink needs superlink_ca (devices use TLS)")
        if self.metadata_url and self.trusted_root is None:
            raise ValueError("metadata_url needs trusted_root (the root.json devices pin)")
        https = registry_is_https(self.metadata_url, self.targets_url)
        if self.registry_ca is not None and not https:
            raise ValueError("registry_ca needs https:// registry URLs")
        if self.server.registry_client_auth and not https:
            raise ValueError("[server] registry_client_auth needs https:// registry URLs")
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


def find_home(root: Path | None = None) -> FleetHome | None:
    """The fleet home for a command that can also run without one.

    ``root`` (``--home`` or ``$EDGEFLEET_HOME``) must hold a fleet; without it, the default
    location is used when it holds one, else None (the command's own defaults apply).
    """
    if root is not None or os.environ.get("EDGEFLEET_HOME"):
        return FleetHome(root)
    default = default_root()
    return FleetHome(default) if (default / "fleet.toml").is_file() else None


def _unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first folder above ``path`` that user ``uid`` may not enter (None: none)."""
    import stat

    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        bit = (stat.S_IXUSR if st.st_uid == uid else
               stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH)
        if not st.st_mode & bit:
            return parent
    return None


def private_dir(path: Path) -> Path:
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
        server = dict(settings.get("server") or {})
        for key in ("certs", "registry", "scorer_package", "broker_dir"):
            if server.get(key) is not None:
                server[key] = Path(server[key]).resolve()
        if server.get("store") and "://" not in str(server["store"]):
            server["store"] = str(Path(server["store"]).resolve())
        settings["server"] = server
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
        private_dir(root)
        (root / "fleet.toml").write_text(dump_toml(cfg.model_dump(mode="json")))
        for sub in ("services", "broker", "nodes", "bundles"):
            private_dir(root / sub)
        home = cls(root)
        for role in SERVICE_ROLES:
            home.service_credentials(role)
        home.broker_files()
        from edgefleet.server.fleet.app_signing import fleet_key

        fleet_key(root)  # the Flower-app signing key devices will trust
        home.ensure_director_key()
        return home

    def ensure_director_key(self) -> None:
        """Give a registry made before directors its director key (``keys init`` makes one
        for a new registry; enrollment bundles carry its public half)."""
        keys_dir = self.registry_path / "keys"
        if not keys_dir.is_dir():
            return
        from edgefleet.server.fleet import director_key
        from edgefleet.server.fleet.keys import KeyRing

        secret = os.environ.get("EDGEFLEET_KEY_PASSPHRASE", "").encode()
        if director_key.ensure(KeyRing(keys_dir, passphrase=secret or None)):
            log.info("created the director key in %s", keys_dir)

    @property
    def broker_dir(self) -> Path:
        """Where the broker's files are (``[server] broker_dir``, else ``<home>/broker``)."""
        return self.settings.server.broker_dir or self.root / "broker"

    @property
    def registry_path(self) -> Path:
        """The model registry's folder."""
        return self.settings.server.registry or self.root / "registry"

    @property
    def store_target(self) -> str:
        """The fleet store (SQLite path or DSN) the ingest writes and ``fleet ls`` reads."""
        return self.settings.server.store or str(self.root / "fleet.db")

    @property
    def fl_dir(self) -> Path:
        """``edgefleet train``'s work folder (run database ``fl.db``)."""
        return self.root / "fl"

    @property
    def logs_dir(self) -> Path:
        """Logs of the services ``edgefleet server up`` runs."""
        return private_dir(self.root / "logs")

    @property
    def run_dir(self) -> Path:
        """Pid and status files of ``edgefleet server up``."""
        return private_dir(self.root / "run")

    def service_password_file(self, role: str) -> Path:
        """The 0600 file holding the broker password of ``role``."""
        self.service_credentials(role)
        return self.root / "services" / f"{role}.password"

    def service_mqtt(self, role: str) -> MqttConfig:
        """How service ``role`` reaches the broker: its loopback listener, the role's
        account, the password read from its file at each connect."""
        from edgefleet.device.core.mqtt_link import MqttConfig

        return MqttConfig(host="127.0.0.1", port=self.settings.server.broker_local_port,
                          username=role, password_file=self.service_password_file(role))

    def service_credentials(self, role: str) -> Credentials:
        """The broker account of ``role`` (created with a random password on first use)."""
        if role not in SERVICE_ROLES:
            raise UsageError(f"unknown service {role!r} (one of {', '.join(SERVICE_ROLES)})")
        path = private_dir(self.root / "services") / f"{role}.password"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24) + "\n")
        return Credentials(role, path.read_text(encoding="utf-8").strip())

    @property
    def device_certs_dir(self) -> Path:
        """Each device's registry client certificate (public), ``<name>.pem``."""
        return self.root / "device-certs"

    @property
    def registry_clients_file(self) -> Path:
        """The registry's allow-list: fingerprints of active devices' certificates."""
        return self.root / "registry-clients.txt"

    def registry_clients(self) -> Path:
        """(Re)write the registry's allow-list from the active devices' certificates.

        The running registry re-reads it on change, so enroll and revoke take effect on
        the next connection. Written atomically: a reader never sees half a list.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding

        lines = ["# edgefleet: devices whose certificate the registry serves (generated)"]
        for row in self.devices.active():
            pem = self.device_certs_dir / f"{row.name}.pem"
            if pem.is_file():
                der = x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(Encoding.DER)
                lines.append(f"{cert_fingerprint(der)}  # {row.name}")
        atomic_write_bytes(self.registry_clients_file, ("\n".join(lines) + "\n").encode(),
                           0o644)
        return self.registry_clients_file

    def broker_files(self) -> BrokerFiles:
        """(Re)write the password and ACL files from services and active devices."""
        active = self.devices.active()
        hashes = {r.mqtt_username: r.mqtt_hash for r in active}
        hashes.update({role: hash_password(self.service_credentials(role).password)
                       for role in SERVICE_ROLES})
        d = private_dir(self.broker_dir)
        pw = write_password_hashes(d / "passwd", hashes)
        acl = write_acl(d / "acl", services=(), roles={r: r for r in SERVICE_ROLES},
                        groups={r.mqtt_username: r.group for r in active})
        self.share_with_broker(d, pw, acl)
        return BrokerFiles(pw, acl)

    def share_with_broker(self, *paths: Path, check: bool = False) -> None:
        """Hand ``paths`` to ``[server] broker_user`` (running as root only).

        Debian's mosquitto starts as root and drops to its own user before it reads the
        password file and ACL ("Unable to open pwfile"): those files (still 0600) and
        their folder become that user's, and the home 0711 so it can reach them by name.
        """
        user = self.settings.server.broker_user
        if not user or os.geteuid() != 0:
            return
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"broker_user {user!r} does not exist",
                              path=str(self.config_path)) from None
        if self.broker_dir.is_relative_to(self.root):
            self.root.chmod(0o711)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        blocked = _unreachable(self.broker_dir, entry.pw_uid, entry.pw_gid) if check else None
        if blocked is not None:
            raise ConfigError(
                f"mosquitto runs as {user} and cannot reach {self.broker_dir} ({blocked} "
                f"is closed to it): put the fleet home where it can (e.g. /srv/edgefleet) "
                f"or set [server] broker_dir", path=str(blocked))

    def superlink_conn(self) -> SuperLinkConn | None:
        """How the ``flwr`` CLI reaches the configured SuperLink (None when none is)."""
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
        pid_file = self.settings.broker_pid_file or self.root / "run" / "mosquitto.pid"
        if not pid_file.is_file():
            log.warning("broker files changed; reload mosquitto (SIGHUP) to apply them")
            return False
        try:
            pid = int(pid_file.read_text().strip())
            comm = Path(f"/proc/{pid}/comm")
            if comm.exists() and "mosquitto" not in comm.read_text():
                raise ProcessLookupError  # a stale pid file: that pid is someone else now
            os.kill(pid, signal.SIGHUP)
        except (ProcessLookupError, ValueError):
            log.warning("mosquitto is not running (stale %s)", pid_file)
            return False
        return True
