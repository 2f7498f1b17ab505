"""The enrollment bundle: everything one device needs to join the fleet, in one place.

A folder (or a ``.tar.gz`` of it) whose files are all 0600::

    agent.toml        template: device_id, group, broker, SuperLink, registry; file
                      references are bare names of files in this bundle
    mqtt.password     the broker password (kept out of agent.toml on purpose)
    broker-ca.pem     the broker's CA, when the broker uses TLS
    superlink-ca.pem  the SuperLink's CA (FL over TLS)
    node.key          the SuperNode private key (its public key is registered)
    root.json         the pinned TUF root: which keys may sign models
    app-trust.yaml    Flower trusted entities: the only key whose Flower apps the
                      device's SuperNode runs (the fleet's app-signing key)
    registry-ca.pem   the CA of the registry's HTTPS certificate, when it uses TLS
    fleet.key         the fleet's package-encryption key, when it has one (decrypts
                      encrypted model packages; server/fleet/package_key.py)
    registry-client.pem/.key  the device's client certificate and key, when the registry
                      requires them (``[server] registry_client_auth``)
    director.pub      the director's public key: the only key whose assignments the
                      device acts on (it follows signed rotations from here)

``edgefleet-agent enroll`` (device/agent/enroll.py) installs it and rewrites the names to
absolute paths. The bundle holds secrets: move it to the device over a trusted channel
and delete it afterwards.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from edgefleet.device.core.config import dump_toml
from edgefleet.device.privacy.policy import PrivacyPolicy
from edgefleet.server.fleet.home import FleetSettings

__all__ = ["BUNDLE_FILES", "agent_template", "write_bundle"]

#: ``agent.toml`` keys that name a bundle file, and the file each names.
BUNDLE_FILES: dict[tuple[str, str], str] = {
    ("mqtt", "password_file"): "mqtt.password",
    ("mqtt", "ca_file"): "broker-ca.pem",
    ("fl", "root_certificates"): "superlink-ca.pem",
    ("fl", "auth_private_key"): "node.key",
    ("fl", "trusted_app_keys"): "app-trust.yaml",
    ("updates", "trusted_root"): "root.json",
    ("updates", "ca_file"): "registry-ca.pem",
    ("updates", "fleet_key"): "fleet.key",
    ("updates", "client_cert"): "registry-client.pem",
    ("updates", "client_key"): "registry-client.key",
    ("updates", "director_key"): "director.pub",
}


def agent_template(s: FleetSettings, name: str, group: str,
                   app_trust: bool = False, fleet_key: bool = False,
                   director: bool = False) -> dict[str, Any]:
    """The ``agent.toml`` of a device, with bundle file names for paths."""
    mqtt: dict[str, Any] = {"host": s.broker_host, "port": s.broker_port, "username": name,
                            "password_file": "mqtt.password"}
    if s.broker_ca:
        mqtt["ca_file"] = "broker-ca.pem"
    cfg: dict[str, Any] = {"device_id": name, "group": group, "mqtt": mqtt}
    if s.metadata_url:
        cfg["updates"] = {"enabled": True, "metadata_url": s.metadata_url,
                          "targets_url": s.targets_url, "trusted_root": "root.json"}
        if s.registry_ca:
            cfg["updates"]["ca_file"] = "registry-ca.pem"
        if fleet_key:
            cfg["updates"]["fleet_key"] = "fleet.key"
            cfg["updates"]["require_encryption"] = s.encrypt_models
        if s.server.registry_client_auth:
            cfg["updates"]["client_cert"] = "registry-client.pem"
            cfg["updates"]["client_key"] = "registry-client.key"
        if director:
            cfg["updates"]["director_key"] = "director.pub"
    if s.superlink:
        # The device's privacy policy, written out in full so the operator installing the
        # device sees (and may tighten) what it will accept from any server.
        cfg["fl"] = {"enabled": True, "superlink": s.superlink, "insecure": False,
                     "root_certificates": "superlink-ca.pem", "auth_private_key": "node.key",
                     "privacy": PrivacyPolicy().model_dump()}
        if app_trust:
            cfg["fl"]["trusted_app_keys"] = "app-trust.yaml"
    return cfg


def _copy_private(src: Path, dst: Path) -> None:
    fd = os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(src.read_bytes())


def write_bundle(s: FleetSettings, name: str, group: str, password: str, stage: Path,
                 out: Path, app_trust: str | None = None, fleet_key: Path | None = None,
                 director_pub: Path | None = None) -> Path:
    """Fill ``stage`` (which may hold ``node.key``) and move it to ``out``.

    ``app_trust`` is the trusted-entities YAML of the fleet's app-signing key;
    ``fleet_key`` the fleet's package-encryption key file (devices get the private key);
    ``director_pub`` the director's public key file (with updates enabled).

    ``out`` ending in ``.tar.gz``/``.tgz`` gets an archive (0600), else a 0700 folder.
    """
    trust = app_trust is not None and bool(s.superlink)
    with_key = fleet_key is not None and bool(s.metadata_url)
    director = director_pub is not None and bool(s.metadata_url)
    (stage / "agent.toml").write_text(dump_toml(agent_template(s, name, group, trust,
                                                               with_key, director)))
    if trust:
        assert app_trust is not None
        (stage / "app-trust.yaml").write_text(app_trust)
    (stage / "mqtt.password").write_text(password + "\n")
    (stage / "node.pub").unlink(missing_ok=True)  # public; the server keeps it
    for src, dst in ((s.broker_ca, "broker-ca.pem"), (s.superlink_ca, "superlink-ca.pem"),
                     (s.trusted_root, "root.json"), (s.registry_ca, "registry-ca.pem"),
                     (fleet_key if with_key else None, "fleet.key"),
                     (director_pub if director else None, "director.pub")):
        if src is not None:
            _copy_private(src, stage / dst)
    for f in stage.iterdir():
        f.chmod(0o600)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.name.endswith((".tar.gz", ".tgz")):
        fd = os.open(out, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for f in sorted(stage.iterdir()):
                tar.add(f, arcname=f"{name}/{f.name}")
        return out
    out.mkdir(mode=0o700, exist_ok=True)
    out.chmod(0o700)
    for f in stage.iterdir():
        shutil.move(str(f), out / f.name)
    return out
