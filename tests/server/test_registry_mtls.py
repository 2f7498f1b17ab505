"""Authenticated downloads (issue 19, item 4): the registry requires a fleet client
certificate that is enrolled now, over real TLS on loopback with the real TUF client.

No certificate, one from another CA, and one taken off the allow-list (revoked) are all
refused with ``client_cert`` while the device keeps serving; the revocation takes effect
on the running server, without a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.device.core import errors
from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.device.wire.updates import Assignment
from edgefleet.server.fleet.pki import (
    CertPaths,
    cert_fingerprint,
    init_certs,
    issue_client_cert,
    issue_server_cert,
)
from edgefleet.server.registry.http import ClientAllowList, RegistryServer, server_tls_context
from edgefleet.server.registry.repository import Registry
from tests.support.updates import make_device, make_registry, package_version

pytestmark = pytest.mark.timeout(120)


class Bench:
    def __init__(self, tmp: Path, pkg: Path) -> None:
        self.tmp = tmp
        self.ca: CertPaths = init_certs(tmp / "certs")
        self.reg: Registry = make_registry(tmp / "registry")
        for v in ("1.0.0", "1.1.0"):
            self.reg.push(package_version(pkg, tmp / "p" / v, v))
        cert, key = issue_server_cert(self.ca.ca.parent, "registry", ["127.0.0.1"])
        self.allow = tmp / "registry-clients.txt"
        self.allow.write_text("")
        self.srv = RegistryServer(self.reg.repo.metadata_dir, self.reg.artifacts,
                                  tls=server_tls_context(cert, key, client_ca=self.ca.ca),
                                  clients=ClientAllowList(self.allow)).start()

    def device_cert(self, name: str, ca_dir: Path | None = None) -> tuple[Path, Path, str]:
        d = self.tmp / "devcerts"
        d.mkdir(exist_ok=True)
        der = issue_client_cert(ca_dir or self.ca.ca.parent, name, d / f"{name}.pem",
                                d / f"{name}.key")
        return d / f"{name}.pem", d / f"{name}.key", cert_fingerprint(der)

    def client(self, state: str, cert: Path | None = None, key: Path | None = None
               ) -> TufClient:
        cfg = TufClientConfig(f"{self.srv.url}/metadata/", f"{self.srv.url}/targets/",
                              ca_file=self.ca.ca, client_cert=cert, client_key=key)
        return TufClient(self.tmp / state, cfg, self.reg.repo.root_bytes(1))


@pytest.fixture
def bench(tmp_path: Path, digits_package: Path) -> Iterator[Bench]:
    b = Bench(tmp_path, digits_package)
    yield b
    b.srv.stop()
    b.reg.close()


def test_enrolled_device_downloads_and_revocation_stops_it(bench: Bench) -> None:
    cert, key, fp = bench.device_cert("pi-1")
    bench.allow.write_text(f"{fp}  # pi-1\n")
    dev = make_device(bench.tmp / "pi-1", bench.reg, bench.srv.url, ca_file=bench.ca.ca)
    dev.updater.tuf = bench.client("pi-1", cert, key)
    assert dev.updater.apply(Assignment("digits-mlp", "1.0.0")) == "activated"
    assert bench.srv.clients_refused == 0

    bench.allow.write_text("")  # what `edgefleet devices revoke` does to the list
    with pytest.raises(errors.ClientCertRejected, match="403") as info:
        dev.updater.apply(Assignment("digits-mlp", "1.1.0"))
    assert info.value.reason == "client_cert"
    assert dev.events[-1][0] == "rejected" and dev.events[-1][1]["reason"] == "client_cert"
    assert dev.metrics.counter("update_rejected_client_cert") == 1
    assert bench.srv.clients_refused >= 1
    assert dev.serving.active is not None and dev.serving.active.manifest.version == "1.0.0"

    bench.allow.write_text(f"{fp}  # pi-1 enrolled again\n")  # and back, still no restart
    assert dev.updater.apply(Assignment("digits-mlp", "1.1.0")) == "activated"


def test_device_without_a_client_certificate_cannot_download(bench: Bench) -> None:
    failures = bench.srv.tls_handshake_failures
    with pytest.raises(errors.ClientCertRejected) as info:
        bench.client("anon").fetch("digits-mlp/1.0.0.tar", bench.tmp / "x.tar")
    assert info.value.reason == "client_cert"
    assert "client_cert" in str(info.value)
    assert bench.srv.tls_handshake_failures > failures
    assert not (bench.tmp / "x.tar").exists()


def test_certificate_from_another_ca_cannot_download(bench: Bench) -> None:
    other = init_certs(bench.tmp / "other")  # same CN, another key: not the fleet's CA
    cert, key, fp = bench.device_cert("pi-2", other.ca.parent)
    bench.allow.write_text(f"{fp}\n")  # even listed, the handshake refuses it
    failures = bench.srv.tls_handshake_failures
    with pytest.raises(errors.ClientCertRejected):
        bench.client("pi-2", cert, key).refresh()
    assert bench.srv.tls_handshake_failures > failures


def test_fleet_certificate_not_on_the_list_cannot_download(bench: Bench) -> None:
    """Issued by the fleet CA but never enrolled (or re-issued): the list decides."""
    cert, key, _fp = bench.device_cert("pi-3")
    with pytest.raises(errors.ClientCertRejected, match="403"):
        bench.client("pi-3", cert, key).refresh()
    assert bench.srv.clients_refused >= 1


def test_allow_list_reads_only_fingerprints(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    fp = "ab" * 32
    path.write_text(f"# enrolled devices\n{fp.upper()}  # pi-1\nnot-a-fingerprint\n\n")
    allow = ClientAllowList(path)
    assert allow.allowed() == {fp}
    path.unlink()
    assert allow.allowed() == frozenset()  # a missing list admits no one
    assert not allow.admits(None)


def test_allow_list_needs_client_certificates(bench: Bench) -> None:
    cert, key = issue_server_cert(bench.ca.ca.parent, "registry2", ["127.0.0.1"])
    with pytest.raises(ValueError, match="client certificates"):
        RegistryServer(bench.reg.repo.metadata_dir, bench.reg.artifacts,
                       tls=server_tls_context(cert, key), clients=ClientAllowList(bench.allow))


def test_enrollment_issues_the_certificate_and_revoke_stops_downloads(
        tmp_path: Path, digits_package: Path) -> None:
    """The fleet path: `devices enroll` puts a client certificate in the bundle and its
    fingerprint on the registry's list; the installed agent config presents it; `devices
    revoke` takes it off the list and the running registry refuses the next download."""
    import tomllib

    from edgefleet.device.agent.enroll import install_bundle
    from edgefleet.device.agent.settings import AgentConfig
    from edgefleet.server.fleet.enrollment import enroll_device, revoke_device
    from edgefleet.server.fleet.home import FleetHome

    ca = init_certs(tmp_path / "certs")
    cert, key = issue_server_cert(ca.ca.parent, "registry", ["127.0.0.1"])
    reg = make_registry(tmp_path / "registry")
    reg.push(package_version(digits_package, tmp_path / "p" / "1.0.0", "1.0.0"))
    home = FleetHome.create(
        tmp_path / "home", trusted_root=reg.repo.metadata_dir / "1.root.json",
        registry_ca=ca.ca, metadata_url="https://127.0.0.1:1/metadata/",
        targets_url="https://127.0.0.1:1/targets/",
        server={"certs": ca.ca.parent, "registry_client_auth": True})
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts,
                         tls=server_tls_context(cert, key, client_ca=ca.ca),
                         clients=ClientAllowList(home.registry_clients_file)).start()
    try:
        bundle = enroll_device(home, "pi-01", out=tmp_path / "bundle")
        agent = tomllib.loads((bundle / "agent.toml").read_text())["updates"]
        assert (agent["client_cert"], agent["client_key"]) == ("registry-client.pem",
                                                               "registry-client.key")
        assert ((bundle / "registry-client.key").stat().st_mode & 0o777) == 0o600
        cfg = AgentConfig.model_validate(tomllib.loads(
            install_bundle(bundle, tmp_path / "state").read_text()))
        u = cfg.updates
        assert u.client_cert is not None and u.client_cert.is_file()
        listed = home.registry_clients_file.read_text()
        assert "pi-01" in listed

        def client() -> TufClient:  # the agent's TufClient, as the daemon builds it
            return TufClient(tmp_path / "state" / "tuf-state", TufClientConfig(
                f"{srv.url}/metadata/", f"{srv.url}/targets/", ca_file=u.ca_file,
                client_cert=u.client_cert, client_key=u.client_key),
                reg.repo.root_bytes(1))

        client().fetch("digits-mlp/1.0.0.tar", tmp_path / "ok.tar")
        assert (tmp_path / "ok.tar").stat().st_size > 10_000

        revoke_device(home, "pi-01")
        assert "pi-01" not in home.registry_clients_file.read_text()
        with pytest.raises(errors.ClientCertRejected, match="403"):
            client().fetch("digits-mlp/1.0.0.tar", tmp_path / "revoked.tar")
        assert not (tmp_path / "revoked.tar").exists()
    finally:
        srv.stop()
        reg.close()
