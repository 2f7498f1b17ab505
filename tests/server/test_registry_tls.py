"""The registry over HTTPS: one fleet CA signs its certificate, devices verify it.

Real TLS on loopback (the standard library server, urllib3 in ngclient's fetcher), real
TUF metadata, the real updater with its slots and health check.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.agent.settings import AgentConfig
from edgefleet.device.core import errors
from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.device.wire.updates import Assignment
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.pki import CertPaths, init_certs, issue_server_cert
from edgefleet.server.registry.http import RegistryServer, server_tls_context
from edgefleet.server.registry.repository import Registry
from tests.conftest import BIN, run_cli
from tests.support.updates import make_device, make_registry, package_version


@pytest.fixture
def fleet_ca(tmp_path: Path) -> CertPaths:
    """The fleet CA (what `edgefleet certs init` makes for the SuperLink)."""
    return init_certs(tmp_path / "certs")


@pytest.fixture
def registry(tmp_path: Path, digits_package: Path) -> Iterator[Registry]:
    reg = make_registry(tmp_path / "registry")
    for v in ("1.0.0", "1.1.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    yield reg
    reg.close()


def _serves(dev: Any) -> str:
    """Answer one inference and return the version of the model that answered."""
    m = dev.serving.active.manifest
    pred = dev.serving.predict(np.zeros(m.input.shape, dtype=np.float32))
    assert np.isfinite(pred.confidence)
    return str(dev.serving.active.manifest.version)


def test_device_updates_over_https_and_refuses_a_wrong_ca(
        tmp_path: Path, fleet_ca: CertPaths, registry: Registry) -> None:
    cert, key = issue_server_cert(fleet_ca.ca.parent, "registry", ["127.0.0.1", "localhost"])
    other_ca = init_certs(tmp_path / "other").ca  # same CN, different key: a MITM's CA
    srv = RegistryServer(registry.repo.metadata_dir, registry.artifacts,
                         tls=server_tls_context(cert, key)).start()
    try:
        assert srv.url.startswith("https://")
        dev = make_device(tmp_path / "dev", registry, srv.url, ca_file=fleet_ca.ca)
        assert dev.updater.apply(Assignment("digits-mlp", "1.0.0")) == "activated"
        assert _serves(dev) == "1.0.0"

        # The same device, now trusting another CA: every fetch is refused at the handshake,
        # counted, reported, and the active model keeps answering.
        failures = srv.tls_handshake_failures
        dev.updater.tuf = TufClient(tmp_path / "dev", TufClientConfig(
            f"{srv.url}/metadata/", f"{srv.url}/targets/", ca_file=other_ca),
            registry.repo.root_bytes(1))
        with pytest.raises(errors.TlsRejected, match=r"TLS handshake failed.*ca_file") as exc:
            dev.updater.apply(Assignment("digits-mlp", "1.1.0"))
        assert isinstance(exc.value, errors.UpdateUnavailable)  # the agent retries later
        assert exc.value.reason == "tls"
        assert dev.metrics.counter("update_rejected_tls") == 1
        assert dev.events[-1][0] == "rejected" and dev.events[-1][1]["reason"] == "tls"
        assert srv.tls_handshake_failures > failures
        assert _serves(dev) == "1.0.0"

        # No CA configured: the system trust store does not know the fleet CA either.
        bare = TufClient(tmp_path / "bare", TufClientConfig(
            f"{srv.url}/metadata/", f"{srv.url}/targets/"), registry.repo.root_bytes(1))
        with pytest.raises(errors.TlsRejected, match="local issuer"):
            bare.refresh()
        # A plain-HTTP client against the TLS port gets nothing, and a clear reason.
        plain = srv.url.replace("https://", "http://")
        dumb = TufClient(tmp_path / "plain", TufClientConfig(
            f"{plain}/metadata/", f"{plain}/targets/"), registry.repo.root_bytes(1))
        with pytest.raises(errors.UpdateUnavailable, match=r"/metadata/2\.root\.json: "):
            dumb.refresh()
    finally:
        srv.stop()

    # Plain HTTP is unchanged (loopback, development).
    http = RegistryServer(registry.repo.metadata_dir, registry.artifacts).start()
    try:
        assert http.url.startswith("http://")
        dev2 = make_device(tmp_path / "dev2", registry, http.url)
        assert dev2.updater.apply(Assignment("digits-mlp", "1.1.0")) == "activated"
        # A device told https:// that meets a plain-HTTP server refuses it as TLS.
        https = http.url.replace("http://", "https://")
        told = TufClient(tmp_path / "told", TufClientConfig(
            f"{https}/metadata/", f"{https}/targets/", ca_file=fleet_ca.ca),
            registry.repo.root_bytes(1))
        with pytest.raises(errors.TlsRejected):
            told.refresh()
    finally:
        http.stop()


def test_server_refuses_tls_below_1_2(tmp_path: Path, fleet_ca: CertPaths,
                                      registry: Registry) -> None:
    import socket
    import ssl

    cert, key = issue_server_cert(fleet_ca.ca.parent, "registry", ["127.0.0.1"])
    srv = RegistryServer(registry.repo.metadata_dir, registry.artifacts,
                         tls=server_tls_context(cert, key)).start()
    try:
        host, port = srv.server_address[:2]
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(fleet_ca.ca))
        try:
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        except (ValueError, ssl.SSLError):
            pytest.skip("this OpenSSL cannot even offer TLS 1.1")
        with socket.create_connection((str(host), port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="127.0.0.1")
        good = ssl.create_default_context(cafile=str(fleet_ca.ca))
        with socket.create_connection((str(host), port), timeout=10) as raw, \
                good.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        srv.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_registry_serve_with_tls_cli(tmp_path: Path, registry: Registry) -> None:
    """`certs init` + `certs issue registry` + `registry serve --tls-cert/--tls-key`."""
    certs = tmp_path / "fleet-certs"
    assert run_cli("certs", "init", "--out", str(certs), "--json").returncode == 0
    res = run_cli("certs", "issue", "registry", "--ca-dir", str(certs), "--host", "127.0.0.1",
                  "--json")
    assert res.returncode == 0, res.stderr
    issued = json.loads(res.stdout)
    assert Path(issued["ca"]) == certs / "ca.pem"
    assert oct(Path(issued["key"]).stat().st_mode & 0o777) == "0o600"
    home = str(tmp_path / "registry")

    bad = run_cli("registry", "serve", "--registry", home, "--tls-cert", issued["cert"])
    assert bad.returncode == 64 and "go together" in bad.stderr
    bad = run_cli("registry", "serve", "--registry", home, "--port", "0",
                  "--tls-cert", str(certs / "ca.pem"), "--tls-key", issued["key"])
    assert bad.returncode == 78 and "TLS certificate or key" in bad.stderr
    bad = run_cli("certs", "issue", "registry", "--ca-dir", str(tmp_path / "nowhere"))
    assert bad.returncode == 64 and "certs init" in bad.stderr

    proc = subprocess.Popen([str(BIN / "edgefleet"), "registry", "serve", "--port", "0",
                             "--registry", home, "--tls-cert", issued["cert"],
                             "--tls-key", issued["key"]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split(" at ", 1)[1].split()[0]
        assert url.startswith("https://127.0.0.1:")
        root = registry.repo.root_bytes(1)
        device = TufClient(tmp_path / "dev", TufClientConfig(
            f"{url}/metadata/", f"{url}/targets/", ca_file=certs / "ca.pem"), root)
        info = device.fetch("digits-mlp/1.1.0.tar", tmp_path / "dev" / "p.tar")
        assert info.length == (tmp_path / "dev" / "p.tar").stat().st_size
        stranger = TufClient(tmp_path / "stranger", TufClientConfig(
            f"{url}/metadata/", f"{url}/targets/",
            ca_file=init_certs(tmp_path / "other").ca), root)
        with pytest.raises(errors.TlsRejected):
            stranger.fetch("digits-mlp/1.1.0.tar", tmp_path / "stranger" / "p.tar")
        assert not (tmp_path / "stranger" / "p.tar").exists()
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.stderr is not None and "warning" not in proc.stderr.read()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_plain_http_on_a_network_address_warns(tmp_path: Path, registry: Registry) -> None:
    proc = subprocess.Popen([str(BIN / "edgefleet"), "registry", "serve", "--port", "0",
                             "--host", "0.0.0.0", "--registry", str(tmp_path / "registry")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split(" at ", 1)[1].startswith("http://0.0.0.0:")
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.stderr is not None
    err = " ".join(proc.stderr.read().split())
    assert "warning: serving plain HTTP on 0.0.0.0" in err and "--tls-cert" in err


def test_fleet_bundle_carries_the_registry_ca(tmp_path: Path, fleet_ca: CertPaths) -> None:
    root = tmp_path / "root.json"
    root.write_text('{"signed": {}}')
    urls = {"metadata_url": "https://reg.example.org/metadata/",
            "targets_url": "https://reg.example.org/targets/"}
    home = FleetHome.create(tmp_path / "home", superlink="127.0.0.1:9092",
                            superlink_ca=fleet_ca.ca, trusted_root=root,
                            registry_ca=fleet_ca.ca, **urls)
    b = enroll_device(home, "pi-01", out=tmp_path / "b")
    assert (b / "registry-ca.pem").read_bytes() == fleet_ca.ca.read_bytes()
    assert tomllib.loads((b / "agent.toml").read_text())["updates"]["ca_file"] == \
        "registry-ca.pem"
    cfg = AgentConfig.model_validate(tomllib.loads(
        install_bundle(b, tmp_path / "state").read_text()))
    assert cfg.updates.ca_file == (tmp_path / "state" / "keys" / "registry-ca.pem").resolve()
    assert cfg.updates.ca_file.read_bytes() == fleet_ca.ca.read_bytes()
    from edgefleet.device.agent.doctor import run_checks

    def keys_check() -> Any:
        return next(c for c in run_checks(cfg) if c.name == "keys")

    assert keys_check().ok
    cfg.updates.ca_file.unlink()  # the doctor names a missing registry CA
    assert not keys_check().ok and "registry-ca.pem" in keys_check().detail

    from edgefleet.device.core.errors import UsageError

    with pytest.raises(UsageError, match="registry_ca needs https"):
        FleetHome.create(tmp_path / "h2", trusted_root=root, registry_ca=fleet_ca.ca,
                         metadata_url="http://reg/metadata/", targets_url="http://reg/targets/")
    with pytest.raises(UsageError, match="both be https"):
        FleetHome.create(tmp_path / "h3", trusted_root=root,
                         metadata_url="https://reg/metadata/", targets_url="http://reg/targets/")


@pytest.mark.parametrize(("updates", "error"), [
    ({"metadata_url": "http://r/metadata/", "ca_file": "ca.pem"}, "not https"),
    ({"metadata_url": "https://r/metadata/", "targets_url": "http://r/targets/"},
     "both be https"),
])
def test_agent_config_refuses_half_tls(updates: dict[str, str], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        AgentConfig.model_validate({"device_id": "d", "updates": {
            "enabled": True, "trusted_root": "root.json", **updates}})


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    with pytest.raises(errors.ConfigError, match="registry CA"):
        TufClient(tmp_path / "d", TufClientConfig("https://r/metadata/", "https://r/targets/",
                                                  ca_file=tmp_path / "ca.pem"), b"{}")
