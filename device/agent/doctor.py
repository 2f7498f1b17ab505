"""``edgefleet-agent doctor``: check a device before (or while) it runs.

Each check returns ``(ok, detail)``; the command prints a table and exits non-zero when
any check failed, so provisioning scripts and systemd ``ExecStartPre=`` can use it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core.errors import EdgefleetError

__all__ = ["Check", "run_checks"]

#: Below this much free space the spool and the update slots cannot do their job.
MIN_FREE_BYTES = 100 * 1024 * 1024
#: A clock before this is a board without RTC that has not synced yet (TUF expiry and
#: Flower's signed timestamps would fail).
EARLIEST_SANE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Check:
    """One line of the doctor's table."""

    name: str
    ok: bool
    detail: str


def _model(cfg: AgentConfig) -> tuple[bool, str]:
    from edgefleet.device.runtime.predictor import Predictor

    if cfg.model.package is None:
        return True, "no bootstrap package (waits for a signed update)"
    p = Predictor.load(cfg.model.package, variant=cfg.model.variant, threads=1)
    return True, f"{p.manifest.name} {p.manifest.version} ({p.variant}): verified, golden ok"


def _keys(cfg: AgentConfig) -> tuple[bool, str]:
    wanted: list[Path] = []
    m = cfg.mqtt
    wanted += [p for p in (m.ca_file, m.cert_file, m.key_file) if p is not None]
    if cfg.updates.enabled:
        wanted += [p for p in (cfg.updates.trusted_root, cfg.updates.ca_file) if p]
    if cfg.fl.enabled:
        wanted += [p for p in (cfg.fl.root_certificates, cfg.fl.auth_private_key) if p]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        return False, "missing: " + ", ".join(missing)
    loose = [str(p) for p in wanted if p.suffix in (".key", ".pem") and "key" in p.name
             and p.stat().st_mode & 0o077]
    if loose:
        return False, "private keys readable by others: " + ", ".join(loose)
    return True, f"{len(wanted)} file(s) present" if wanted else "none configured"


def _broker(cfg: AgentConfig) -> tuple[bool, str]:
    with socket.create_connection((cfg.mqtt.host, cfg.mqtt.port), timeout=3):
        pass
    return True, f"{cfg.mqtt.host}:{cfg.mqtt.port} accepts connections"


def _serial(cfg: AgentConfig) -> tuple[bool, str]:
    url = cfg.input.serial
    if not url:
        return True, "not configured (local API only)"
    if "://" in url:
        return True, f"pyserial URL {url}"
    if not os.path.exists(url):
        return False, f"{url} does not exist"
    if not os.access(url, os.R_OK | os.W_OK):
        return False, f"{url} is not readable and writable by this user"
    return True, url


def _clock(_cfg: AgentConfig) -> tuple[bool, str]:
    now = dt.datetime.now(dt.UTC)
    if now < EARLIEST_SANE:
        return False, f"clock says {now:%Y-%m-%d}: not synced (no RTC?)"
    return True, f"{now:%Y-%m-%d %H:%M:%S} UTC"


def _disk(cfg: AgentConfig) -> tuple[bool, str]:
    probe = cfg.state_dir if cfg.state_dir.exists() else cfg.state_dir.parent
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_BYTES
    return ok, f"{free / 2**20:.0f} MiB free in {probe}" + ("" if ok else " (need 100 MiB)")


CHECKS: list[tuple[str, Callable[[AgentConfig], tuple[bool, str]]]] = [
    ("model", _model), ("keys", _keys), ("broker", _broker), ("serial", _serial),
    ("clock", _clock), ("disk", _disk),
]


def run_checks(cfg: AgentConfig) -> list[Check]:
    """Run every check; an exception in one is that check's failure, not the doctor's."""
    out = []
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        try:
            ok, detail = fn(cfg)
        except (EdgefleetError, OSError) as exc:
            ok, detail = False, str(exc) or type(exc).__name__
        out.append(Check(name, ok, f"{detail} [{(time.perf_counter() - t0) * 1e3:.0f} ms]"))
    return out
