"""The fleet's private CA, its server certificates, and SuperNode authentication keys.

Generated at run time, never committed: a private CA, a SuperLink server certificate
for the given host names/IPs, and one EC P-384 key pair per SuperNode in OpenSSH format
(what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
read). :func:`issue_server_cert` signs more server certificates with the same CA (the
model registry's HTTPS), so devices trust one fleet CA; :func:`issue_client_cert` signs
a device's client certificate (what it shows a registry that requires mutual TLS).
Private keys are mode 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["CertPaths", "cert_fingerprint", "init_certs", "issue_client_cert",
           "issue_server_cert", "make_node_key"]


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`init_certs` put things."""

    ca: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    def public_key(self, i: int) -> Path:
        """The OpenSSH public key of node ``i`` (to register with the SuperLink)."""
        return self.node_keys[i].with_suffix(".pub")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_node_key(path: Path) -> Path:
    """Write an EC P-384 private key (OpenSSH) to ``path`` and its public key to ``.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(path, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    _write(path.with_suffix(".pub"), pub + b"\n")
    return path


def _server_cert(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
                 days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for ``hosts`` (SAN), signed by ``ca``."""
    now = dt.datetime.now(dt.UTC)
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
           .issuer_name(ca.subject).public_key(srv_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5))
           .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
           .add_extension(_san(hosts), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                          critical=False)
           .sign(ca_key, hashes.SHA384()))
    return srv, srv_key


def init_certs(out: Path, hosts: list[str] | None = None, nodes: int = 0,
               days: int = 365) -> CertPaths:
    """Create a CA, a SuperLink certificate for ``hosts`` and ``nodes`` SuperNode key pairs."""
    hosts = hosts or ["127.0.0.1", "localhost", "::1"]
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet FL CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    srv, srv_key = _server_cert(ca, ca_key, hosts, days)
    paths = CertPaths(out / "ca.pem", out / "server.pem", out / "server.key",
                      tuple(out / "nodes" / f"node-{i}.key" for i in range(nodes)))
    _write(paths.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(paths.server_cert, srv.public_bytes(serialization.Encoding.PEM))
    _write(paths.server_key, _pem_key(srv_key), private=True)
    for p in paths.node_keys:
        make_node_key(p)
    return paths


def cert_fingerprint(der: bytes) -> str:
    """The sha256 of a certificate's DER bytes, hex (what the registry's allow-list holds)."""
    return hashlib.sha256(der).hexdigest()


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_pem, ca_key_pem = ca_dir / "ca.pem", ca_dir / "ca.key"
    ca = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_pem.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_pem}: not an EC private key")
    return ca, ca_key


def issue_client_cert(ca_dir: Path, name: str, cert: Path, key: Path,
                      days: int = 3650) -> bytes:
    """Sign a TLS client certificate for device ``name`` (CN) with the fleet CA.

    Written to ``cert`` (0644) and ``key`` (0600); returns the certificate's DER bytes
    (the registry's allow-list holds their sha256). It never outlives the CA.
    """
    ca, ca_key = _load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    dev_key = ec.generate_private_key(ec.SECP384R1())
    crt = (x509.CertificateBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .issuer_name(ca.subject).public_key(dev_key.public_key())
           .serial_number(x509.random_serial_number())
           .not_valid_before(now - dt.timedelta(minutes=5))
           .not_valid_after(min(now + dt.timedelta(days=days), ca.not_valid_after_utc))
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                          critical=False)
           .sign(ca_key, hashes.SHA384()))
    _write(key, _pem_key(dev_key), private=True)
    _write(cert, crt.public_bytes(serialization.Encoding.PEM))
    return crt.public_bytes(serialization.Encoding.DER)


def issue_server_cert(ca_dir: Path, name: str, hosts: list[str],
                      days: int = 365) -> tuple[Path, Path]:
    """Sign ``<ca_dir>/<name>.pem`` (+ ``.key``) for ``hosts`` with the CA of ``init_certs``.

    One CA for the SuperLink and the registry means a device trusts a single fleet root.
    The certificate never outlives the CA. Returns (certificate, private key).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or name in ("ca", "server"):
        raise ValueError(f"bad certificate name {name!r}")
    if not hosts:
        raise ValueError("at least one host name or IP is needed")
    ca, ca_key = _load_ca(ca_dir)
    srv, srv_key = _server_cert(ca, ca_key, hosts, days)
    cert, key = ca_dir / f"{name}.pem", ca_dir / f"{name}.key"
    _write(key, _pem_key(srv_key), private=True)
    _write(cert, srv.public_bytes(serialization.Encoding.PEM))
    return cert, key
