"""``edgefleet-agent enroll``: install an enrollment bundle on the device.

The bundle (server/fleet/enroll_bundle.py) carries the device's secrets; they are copied into
``<state_dir>/keys`` (0700) as 0600 files, and the ``agent.toml`` template's bare file
names become absolute paths there. A fresh sample-store key is made there too, after
any samples of a previous enrollment have been wiped. The result is validated as a
whole ``AgentConfig`` before anything is written, so a bundle that cannot run is refused
on the spot (this includes an ``fl.node_config`` that sets the insecure reproducible-noise
seed, or ``privacy-*`` keys outside ``[fl.privacy]``). With FL enabled, enrollment
creates the device's empty privacy ledger and high-water mark: from then on a SuperNode
started by the agent refuses to train if they are missing, instead of starting a fresh
budget.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.device.agent.samples import wipe_state_store
from edgefleet.device.agent.settings import STORE_KEY, AgentConfig
from edgefleet.device.core.config import deep_merge, dump_toml, read_toml
from edgefleet.device.core.errors import ConfigError, UsageError
from edgefleet.device.data.store import new_key
from edgefleet.device.privacy.ledger import LEDGER_FILE, PrivacyLedger

__all__ = ["install_bundle"]

log = logging.getLogger(__name__)

#: ``agent.toml`` (section, key) pairs that may name a file of the bundle.
_FILE_KEYS = (("mqtt", "password_file"), ("mqtt", "ca_file"), ("mqtt", "cert_file"),
              ("mqtt", "key_file"), ("fl", "root_certificates"), ("fl", "auth_private_key"),
              ("updates", "trusted_root"), ("updates", "ca_file"), ("updates", "client_cert"),
              ("updates", "client_key"), ("fl", "trusted_app_keys"), ("updates", "fleet_key"),
              ("updates", "director_key"))
_MAX_MEMBER_BYTES = 1 << 20


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _extract(archive: Path, into: Path) -> Path:
    """Unpack a bundle archive: only small regular files, no paths outside ``into``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                if m.isdir():
                    continue
                if not m.isfile() or m.size > _MAX_MEMBER_BYTES:
                    raise UsageError(f"{archive}: unexpected member {m.name!r} in the bundle")
                name = Path(m.name).name
                src = tar.extractfile(m)
                if src is None or name.startswith("."):
                    raise UsageError(f"{archive}: unexpected member {m.name!r} in the bundle")
                fd = os.open(into / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(src.read())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UsageError(f"{archive}: not a readable bundle archive ({exc})") from None
    return into


def _install_file(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(src.read_bytes())
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(dst)


def _install(folder: Path, state_dir: Path, config_out: Path,
             overrides: Mapping[str, Any] | None) -> Path:
    template = folder / "agent.toml"
    if not template.is_file():
        raise UsageError(f"{folder}: no agent.toml; is this an edgefleet enrollment bundle?")
    data = read_toml(template)
    state_dir = state_dir.resolve()
    keys = state_dir / "keys"
    wanted: dict[Path, Path] = {}
    for section, key in _FILE_KEYS:
        ref = data.get(section, {}).get(key)
        if ref is None:
            continue
        src = folder / str(ref)
        if Path(str(ref)).name != str(ref) or not src.is_file():
            raise ConfigError(f"names {ref!r}, which the bundle does not hold",
                              path=str(template), key=f"{section}.{key}")
        wanted[src] = keys / str(ref)
        data[section][key] = str(keys / str(ref))
    data["state_dir"] = str(state_dir)
    if overrides:
        data = deep_merge(data, overrides)
    try:  # refuse before writing anything
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err["msg"]).removeprefix("Value error, ")
        hint = " (pass --model PKG)" if "model.package" in msg else ""
        raise ConfigError(msg + hint, path=str(template),
                          key=".".join(str(x) for x in err["loc"]) or None) from None
    _private_dir(state_dir)
    _private_dir(keys)
    # A new enrollment is a new device: what the old one collected goes, and its samples
    # are sealed with a key of its own.
    wiped = wipe_state_store(state_dir, cfg.store_path)
    if wiped:
        log.warning("re-enrollment: wiped %d samples of the previous enrollment", wiped)
    new_key(keys / STORE_KEY)
    for src, dst in wanted.items():
        _install_file(src, dst)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = config_out.with_name(f".{config_out.name}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("# Written by `edgefleet-agent enroll`; secrets live in the keys folder.\n")
        fh.write(dump_toml(data))
    tmp.replace(config_out)
    if cfg.fl.enabled:  # the privacy ledger exists from now on: deleting it is refused
        PrivacyLedger.initialize(cfg.fl_state_dir / LEDGER_FILE)
    return config_out


def install_bundle(bundle: Path, state_dir: Path, *, config_out: Path | None = None,
                   overrides: dict[str, Any] | None = None) -> Path:
    """Install ``bundle`` (folder or ``.tar.gz``) into ``state_dir``; returns agent.toml.

    ``overrides`` are merged over the template (e.g. ``{"model": {"package": ...}}``);
    ``config_out`` defaults to ``<state_dir>/agent.toml``.
    """
    bundle = Path(bundle)
    config_out = Path(config_out) if config_out else Path(state_dir) / "agent.toml"
    if bundle.is_dir():
        return _install(bundle, Path(state_dir), config_out, overrides)
    if not bundle.is_file():
        raise UsageError(f"{bundle}: no such bundle")
    with tempfile.TemporaryDirectory(prefix=".edgefleet-bundle-") as tmp:
        return _install(_extract(bundle, Path(tmp)), Path(state_dir), config_out, overrides)
