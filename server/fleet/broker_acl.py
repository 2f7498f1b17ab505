"""Broker access control for the fleet: mosquitto's password file and ACL file.

Each device authenticates as a user named by its device id (a password, or a client
certificate whose CN is the id with ``use_identity_as_username true``). The ACL gives
devices *pattern* rules on ``%u``, so a device may publish only under
``edgefleet/v1/<its own id>/...``; services (the ingest) get explicit read rules; and
nothing is granted to anyone else, which with mosquitto's ACL file means deny.

Password hashes are written by us in mosquitto 2's ``$7$`` format (PBKDF2-SHA512,
base64 salt and hash) so enrolling a device needs neither ``mosquitto_passwd`` nor a
shell-out with the password on a command line.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from edgefleet.device.core.errors import UsageError
from edgefleet.device.wire.telemetry import DEVICE_ID_PATTERN, TOPIC_ROOT

__all__ = ["RESERVED_NAMES", "ROLE_RULES", "hash_password", "render_acl", "verify_password",
           "write_acl", "write_password_file", "write_password_hashes"]

PBKDF2_ITERATIONS = 1000
_UPDATE = f"{TOPIC_ROOT}/update"
_LOGS = f"{TOPIC_ROOT}/logs"

#: What each service role may do (docs/operations.md "Broker accounts"): the ingest reads
#: device telemetry, a scorer answers score requests on the devices' response topics and
#: announces itself, the operator (rollout, ``devices logs``) publishes assignments and
#: watches outcomes, asks devices for their logs and reads the answers.
ROLE_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "ingest": (("read", f"{TOPIC_ROOT}/+/+"),),
    "scorer": (("read", f"{TOPIC_ROOT}/score/request/+"),
               ("write", f"{TOPIC_ROOT}/score/response/+"),
               ("readwrite", f"{TOPIC_ROOT}/scorer/#")),
    "operator": (("readwrite", f"{_UPDATE}/assign/#"), ("read", f"{_UPDATE}/state/+"),
                 ("read", f"{_UPDATE}/event/+"), ("write", f"{_LOGS}/request/+"),
                 ("read", f"{_LOGS}/response/+")),
}

#: Names a device may not take: the first level under ``edgefleet/v1/`` that services use
#: (a device called ``score`` would otherwise own ``edgefleet/v1/score/...`` topics).
RESERVED_NAMES = frozenset({"score", "scorer", "update", "cmd", "logs"})

#: Rules every authenticated user gets, on its own user name (``%u``).
_DEVICE_PATTERNS = (
    f"pattern write {TOPIC_ROOT}/%u/metrics",
    f"pattern write {TOPIC_ROOT}/%u/event",
    f"pattern write {TOPIC_ROOT}/%u/status",
    f"pattern read {TOPIC_ROOT}/%u/cmd/#",
    f"pattern write {TOPIC_ROOT}/score/request/%u",
    f"pattern read {TOPIC_ROOT}/score/response/%u",
    f"pattern read {_UPDATE}/assign/device/%u",
    f"pattern write {_UPDATE}/state/%u",
    f"pattern write {_UPDATE}/event/%u",
    f"pattern read {_LOGS}/request/%u",
    f"pattern write {_LOGS}/response/%u",
)
_SALT_BYTES = 12


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """``$7$<iterations>$<salt>$<hash>``, the format mosquitto 2 reads."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a ``$7$`` hash (for tests and ``enroll`` checks)."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt = base64.b64decode(parts[3])
    expect = hash_password(password, iterations=int(parts[2]), salt=salt)
    return secrets.compare_digest(expect, encoded)


def _check_name(name: str) -> str:
    if not re.fullmatch(DEVICE_ID_PATTERN, name):
        raise UsageError(f"{name!r} is not a valid device or service name "
                         "(letters, digits, '.', '_', '-'; at most 64)")
    return name


def _write_private(path: Path, text: str) -> Path:
    """Write atomically with mode 0600 (these files hold secrets and identities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A mosquitto ``password_file`` for ``{user: password}`` (mode 0600)."""
    return write_password_hashes(path, {u: hash_password(p) for u, p in users.items()})


def write_password_hashes(path: Path, hashes: Mapping[str, str]) -> Path:
    """A ``password_file`` from stored ``$7$`` hashes (the fleet home keeps no passwords)."""
    lines = [f"{_check_name(u)}:{h}" for u, h in sorted(hashes.items())]
    return _write_private(path, "\n".join(lines) + "\n" if lines else "")


def render_acl(services: Iterable[str] = ("ingest",), admins: Iterable[str] = (), *,
               roles: Mapping[str, str] | None = None,
               groups: Mapping[str, str] | None = None) -> str:
    """The ACL: services read all telemetry, devices write only their own topics.

    ``roles`` maps service users to a :data:`ROLE_RULES` role (least privilege);
    ``groups`` maps each device to its group, whose update assignments it may read.
    """
    out = [
        "# Generated by edgefleet (server/fleet/broker_acl.py). Anything not granted is denied.",
        "",
    ]
    for svc in services:
        out += [f"user {_check_name(svc)}", f"topic read {TOPIC_ROOT}/#", ""]
    for adm in admins:
        out += [f"user {_check_name(adm)}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    for user, role in sorted((roles or {}).items()):
        if role not in ROLE_RULES:
            raise UsageError(f"unknown broker role {role!r} (one of {', '.join(ROLE_RULES)})")
        out += [f"user {_check_name(user)}"]
        out += [f"topic {access} {topic}" for access, topic in ROLE_RULES[role]] + [""]
    for device, group in sorted((groups or {}).items()):
        # Fixed topics go in each device's block: a pattern without %u or %c makes
        # mosquitto warn on every (re)load.
        out += [f"user {_check_name(device)}",
                f"topic read {_UPDATE}/assign/group/{_check_name(group)}",
                f"topic read {_UPDATE}/assign/fleet", ""]
    out += ["# Every authenticated client (device id = username): only its own topics.",
            *_DEVICE_PATTERNS, ""]
    return "\n".join(out)


def write_acl(path: Path, services: Iterable[str] = ("ingest",),
              admins: Iterable[str] = (), *, roles: Mapping[str, str] | None = None,
              groups: Mapping[str, str] | None = None) -> Path:
    """Write :func:`render_acl` to a mosquitto ``acl_file`` (mode 0600)."""
    return _write_private(path, render_acl(services, admins, roles=roles, groups=groups))
