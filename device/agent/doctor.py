"""``edgefleet-agent doctor``: check a device before (or while) it runs.

Each check returns ``(ok, detail)``; the command prints a table and exits non-zero when
any check failed, so provisioning scripts and systemd ``ExecStartPre=`` can use it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        if not cfg.updates.enabled:
            return False, "no model package and no update registry: the agent cannot start"
        return True, "no bootstrap package (waits for a signed update)"
    p = Predictor.load(cfg.model.package, variant=cfg.model.variant, threads=1)
    return True, f"{p.manifest.name} {p.manifest.version} ({p.variant}): verified, golden ok"


def _keys(cfg: AgentConfig) -> tuple[bool, str]:
    wanted: list[Path] = []
    m = cfg.mqtt
    wanted += [p for p in (m.ca_file, m.cert_file, m.key_file, m.password_file)
               if p is not None]
    if cfg.updates.enabled:
        wanted += [p for p in (cfg.updates.trusted_root, cfg.updates.ca_file,
                               cfg.updates.client_cert, cfg.updates.client_key) if p]
    if cfg.fl.enabled:
        wanted += [p for p in (cfg.fl.root_certificates, cfg.fl.auth_private_key) if p]
    missing = [str(p) for p in wanted if not p.is_file()]
    if missing:
        return False, "missing: " + ", ".join(missing)
    loose = [str(p) for p in wanted if ((p.suffix in (".key", ".pem") and "key" in p.name)
                                        or p == m.password_file) and p.stat().st_mode & 0o077]
    if loose:
        return False, "private keys readable by others: " + ", ".join(loose)
    return True, f"{len(wanted)} file(s) present" if wanted else "none configured"


def _broker(cfg: AgentConfig) -> tuple[bool, str]:
    """A real MQTT 5 CONNECT with the agent's TLS settings and account (its own client
    id, so a running agent keeps its session)."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    m = cfg.mqtt
    where = f"{m.host}:{m.port}"
    secret = m.secret()
    if m.username and not secret:
        return False, f"no password for {m.username} (password_file is empty)"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"doctor-{os.getpid()}",
                    protocol=mqtt.MQTTv5)
    if m.username:
        c.username_pw_set(m.username, secret)
    if m.ca_file is not None:
        c.tls_set(ca_certs=str(m.ca_file),
                  certfile=str(m.cert_file) if m.cert_file else None,
                  keyfile=str(m.key_file) if m.key_file else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    answer: list[Any] = []
    done = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        answer.append(rc)
        done.set()

    c.on_connect = on_connect
    try:
        c.connect(m.host, m.port, keepalive=10)
    except ssl.SSLError as exc:
        return False, f"TLS with {where} failed: {exc.reason or exc}"
    except OSError as exc:
        return False, f"cannot reach {where}: {exc.strerror or exc}"
    c.loop_start()
    try:
        done.wait(8)
    finally:
        c.disconnect()
        c.loop_stop()
    if not answer:
        return False, f"{where}: no answer to CONNECT in 8 s"
    if answer[0].is_failure:
        return False, f"{where} refused {m.username or 'anonymous'}: {answer[0]}"
    return True, (f"{where}: connected as {m.username or 'anonymous'} "
                  f"({'TLS' if m.ca_file else 'no TLS'})")


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _registry(cfg: AgentConfig) -> tuple[bool, str]:
    """Fetch the registry's signed timestamp the way the updater does (TLS, its CA)."""
    import urllib.error
    import urllib.request

    u = cfg.updates
    if not u.enabled:
        return True, "not configured (no updates)"
    url = u.metadata_url.rstrip("/") + "/timestamp.json"
    from edgefleet.device.updates.tuf_client import client_tls_context

    ctx = (client_tls_context(u.ca_file, u.client_cert, u.client_key)
           if url.startswith("https://") else None)
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            resp.read(1 << 16)
    except urllib.error.HTTPError as exc:
        hint = " (this device's certificate is not enrolled: revoked?)" if exc.code == 403 else ""
        return False, f"{url}: HTTP {exc.code}{hint}"
    except urllib.error.URLError as exc:
        return False, f"{url}: {exc.reason}"
    return True, f"{url}: ok ({'TLS' if ctx else 'plain HTTP'})"


def _superlink(cfg: AgentConfig) -> tuple[bool, str]:
    """A TLS handshake with the SuperLink, checked against the fleet CA."""
    fl = cfg.fl
    if not fl.enabled:
        return True, "not configured (no federated learning)"
    host, _, port = fl.superlink.rpartition(":")
    if fl.insecure:
        with socket.create_connection((host, int(port)), timeout=5):
            return True, f"{fl.superlink}: reachable (insecure)"
    ctx = _tls_context(fl.root_certificates)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLError as exc:
            return False, f"TLS with {fl.superlink} failed: {exc.reason or exc}"
    return True, f"{fl.superlink}: TLS ok"


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
    ("model", _model), ("keys", _keys), ("broker", _broker), ("registry", _registry),
    ("superlink", _superlink), ("serial", _serial), ("clock", _clock), ("disk", _disk),
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
