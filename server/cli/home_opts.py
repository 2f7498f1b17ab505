"""The one convention of every service and command: endpoints, credentials and stores
come from the fleet home (``--home``, ``$EDGEFLEET_HOME``); flags override; secrets are
read from files (or ``$EDGEFLEET_MQTT_PASSWORD``), never taken from a command line.

Without a fleet home (none given, none at the default place) the old defaults apply:
broker 127.0.0.1:1883, ``./registry``-less errors, ``~/.local/share/edgefleet/fleet.db``.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.device.core.errors import UsageError

if TYPE_CHECKING:
    from edgefleet.device.core.mqtt_link import MqttConfig
    from edgefleet.server.fleet.home import FleetHome

__all__ = ["BROKER_CA_OPTION", "BROKER_OPTION", "HOME_OPTION", "PASSWORD_FILE_OPTION",
           "USERNAME_OPTION", "fleet_home", "mqtt_for", "parse_broker", "registry_path",
           "store_target"]

HOME_OPTION: Any = typer.Option(
    None, "--home", envvar="EDGEFLEET_HOME",
    help="Fleet home: endpoints, credentials and stores (default: "
         "~/.local/share/edgefleet when it holds a fleet).")
BROKER_OPTION: Any = typer.Option(
    None, "--broker", envvar="EDGEFLEET_BROKER",
    help="Broker HOST:PORT (default: the fleet home's loopback listener, else "
         "127.0.0.1:1883).")
USERNAME_OPTION: Any = typer.Option(
    None, "--username", help="Broker user (default: this service's account in the home).")
PASSWORD_FILE_OPTION: Any = typer.Option(
    None, "--password-file", help="File holding the broker password (default: "
                                  "<home>/services/ROLE.password; or $EDGEFLEET_MQTT_PASSWORD).")
BROKER_CA_OPTION: Any = typer.Option(
    None, "--broker-ca", help="CA of the broker's certificate: connect with TLS (for a "
                              "service on another machine than the broker).")


def parse_broker(value: str, what: str = "--broker") -> tuple[str, int]:
    """``HOST:PORT`` → ``(host, port)``; the one parser of every command's ``--broker``.

    Also accepted: ``HOST`` (port 1883), ``[IPV6]:PORT`` and ``[IPV6]`` (brackets
    removed: the socket layer wants the bare address), ``:PORT`` (127.0.0.1). An
    unbracketed IPv6 address is split at its last colon (``::1:8883`` is ``::1`` port
    8883), so write IPv6 in brackets. A port alone (``1884``) is refused rather than
    taken for a host name.
    """
    text = value.strip()
    bad = UsageError(f"{what} must be HOST:PORT (or HOST, [IPV6]:PORT), not {value!r}")
    if text.startswith("["):
        addr, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise bad
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            raise bad from None
        host, sep, port = addr, rest[:1], rest[1:]
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host = port
        elif not host:
            host = "127.0.0.1"
    if not host or host.isdigit() or any(c.isspace() or c in "[]/@" for c in host):
        raise bad
    if not sep:
        return host, 1883
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise bad
    return host, int(port)


def fleet_home(home: Path | None) -> FleetHome | None:
    """The fleet home (``--home``/``$EDGEFLEET_HOME`` must hold one; the default place
    may not)."""
    from edgefleet.server.fleet.home import find_home

    return find_home(home)


def mqtt_for(role: str, home: Path | None, *, broker: str | None = None,
             username: str | None = None, password_file: Path | None = None,
             broker_ca: Path | None = None) -> MqttConfig:
    """How service ``role`` reaches the broker: the home's account, flags, then env."""
    from edgefleet.device.core.mqtt_link import MqttConfig

    fh = fleet_home(home)
    cfg: dict[str, Any] = (fh.service_mqtt(role).model_dump(exclude_unset=True)
                           if fh is not None else {})
    if broker:
        cfg["host"], cfg["port"] = parse_broker(broker)
    user = username or os.environ.get("EDGEFLEET_MQTT_USERNAME")
    if user:
        cfg["username"] = user
    if password_file is not None:
        if not password_file.is_file():
            raise UsageError(f"--password-file {password_file}: no such file")
        cfg["password_file"], cfg["password"] = password_file, None
    env = os.environ.get("EDGEFLEET_MQTT_PASSWORD")
    if env:
        cfg["password"], cfg["password_file"] = env, None
    if broker_ca is not None:
        cfg["ca_file"] = broker_ca
    return MqttConfig.model_validate(cfg)


def store_target(db: str | None, home: Path | None, *, must_exist: bool = True) -> str:
    """The fleet store: ``--db``/``$EDGEFLEET_DB``, else the home's, else the default.

    ``must_exist``: a SQLite path that does not exist is an error (a typo would silently
    create an empty store).
    """
    from edgefleet.server.telemetry.store import default_db

    fh = fleet_home(home) if db is None else None
    target = db or (fh.store_target if fh is not None else default_db())
    if must_exist and "://" not in target and not Path(target).exists():
        raise UsageError(f"no fleet store at {target} (run `edgefleet ingest run` "
                         "or `edgefleet server up` first, or pass --db)")
    return target


def registry_path(registry: Path | None, home: Path | None) -> Path:
    """The registry folder: ``--registry``/``$EDGEFLEET_REGISTRY``, else the home's
    (``<home>/registry`` unless ``[server] registry`` says otherwise)."""
    if registry is not None:
        return registry
    from edgefleet.server.fleet.home import FleetHome, default_root

    root = Path(home) if home is not None else default_root()
    if (root / "fleet.toml").is_file():
        return FleetHome(root).registry_path
    return root / "registry"  # `keys init` comes before `fleet init`
