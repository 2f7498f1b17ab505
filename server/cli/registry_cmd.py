"""``edgefleet registry``: push signed model packages, list them, serve them to devices."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.home_opts import HOME_OPTION
from edgefleet.server.cli.metrics_cmd import (
    METRICS_HOST_OPTION,
    METRICS_PORT_OPTION,
    start_metrics,
)

if TYPE_CHECKING:
    from edgefleet.server.registry.repository import Registry

__all__ = ["HOME", "PASSPHRASE_FILE", "ROOT_KEY", "accuracy", "app", "open_registry",
           "registered_tau", "warn_no_tau"]

app = typer.Typer(help="The model registry: versions, lineage, metrics, TUF-signed artifacts.",
                  no_args_is_help=True)

HOME = typer.Option(None, "--registry", envvar="EDGEFLEET_REGISTRY",
                    help="Registry folder: database, artifacts, TUF metadata, audit log "
                         "(default: the fleet home's, <home>/registry).")
ROOT_KEY = typer.Option(None, "--root-key", envvar="EDGEFLEET_ROOT_KEY",
                        help="Root private key kept offline (default: <registry>/keys/root.pem).")
PASSPHRASE_FILE = typer.Option(None, "--passphrase-file",
                               help="File holding the key passphrase (or set "
                                    "EDGEFLEET_KEY_PASSPHRASE).")


def open_registry(home: Path | None, root_key: Path | None = None,
                  passphrase_file: Path | None = None, *, fleet: Path | None = None,
                  create: bool = False) -> Registry:
    """The registry in ``home`` (None: the fleet home's) with its key ring (passphrase
    from file or environment). A registry that does not exist is an error unless
    ``create`` (``keys init``): a mistyped path must not become an empty registry."""
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.cli.home_opts import registry_path
    from edgefleet.server.fleet.keys import KeyRing
    from edgefleet.server.registry.repository import Registry

    home = registry_path(home, fleet)
    if not create and not (home / "registry.db").is_file():
        raise UsageError(f"no model registry at {home} (create one with `edgefleet keys "
                         "init`, or pass --registry)")

    secret = (passphrase_file.read_bytes().strip() if passphrase_file
              else os.environ.get("EDGEFLEET_KEY_PASSPHRASE", "").encode())
    keys = KeyRing(home / "keys", passphrase=secret or None, root_key=root_key)
    return Registry(home, keys)


NO_TAU = ("has no τ (fallback_threshold): devices running it never ask the cloud "
          "scorer. Choose one with `edgefleet models cascade PACKAGE CLOUD_PACKAGE` and push "
          "that as a new version")


def registered_tau(reg: Registry, sha256: str) -> float | None:
    """τ of a registered version, read from the manifest inside its stored archive."""
    import json
    import tarfile

    from edgefleet.device.runtime.envelope import is_encrypted

    if is_encrypted(reg.artifacts / sha256):
        return None  # the registry cannot read it; the caller checks the record instead
    with tarfile.open(reg.artifacts / sha256) as tar:
        member = tar.extractfile("manifest.json")
        if member is None:
            return None
        tau = json.loads(member.read()).get("fallback_threshold")
    return float(tau) if isinstance(tau, int | float) else None


def warn_no_tau(ref: str) -> None:
    """The loud warning for a package that never escalates."""
    from edgefleet.device.core.cli_support import err_console

    err_console.print(f"[bold yellow]warning:[/] {ref} {NO_TAU}", highlight=False)


def accuracy(metrics: object) -> float | None:
    """The test accuracy a package's manifest reports: top-level, else its first variant's
    (``{"onnx-fp32": {"accuracy": ...}, ...}``), else None."""
    if not isinstance(metrics, dict):
        return None
    acc = metrics.get("accuracy")
    if isinstance(acc, int | float):
        return float(acc)
    if isinstance(acc, dict):
        metrics = acc
    for key in sorted(metrics):
        v = metrics[key]
        if isinstance(v, dict) and isinstance(v.get("accuracy"), int | float):
            return float(v["accuracy"])
        if isinstance(v, int | float) and isinstance(acc, dict):
            return float(v)
    return None


@app.command()
def push(
    package: Path = typer.Argument(..., help="Model package folder (with manifest.json)."),
    home: Path = HOME,
    passphrase_file: Path | None = PASSPHRASE_FILE,
    encrypt: bool = typer.Option(False, "--encrypt", help="Encrypt for the fleet key "
                                 "(`keys fleet-key init`): the registry stores and serves "
                                 "only ciphertext, TUF signs it."),
    fleet_keys: Path | None = typer.Option(None, "--fleet-keys", help="Folder with fleet.pub "
                                           "(and previous.pub) to encrypt for (default: the "
                                           "fleet home's package-key/)."),
    fleet: Path | None = HOME_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Verify a package, store it by sha256 and sign it into the TUF targets metadata.

    With --encrypt (or `encrypt_models = true` in fleet.toml) the stored archive is
    encrypted for the fleet's package key; devices decrypt it into their model slot.

    Example: edgefleet registry push out/digits --registry /srv/edgefleet/registry --encrypt
    """
    from edgefleet.device.runtime.manifest import read_manifest
    from edgefleet.server.fleet.home import find_home
    from edgefleet.server.fleet.package_key import publish_keys

    fh = None
    if fleet_keys is None:
        # a registry may live without a fleet (`keys init` alone): then nothing to read
        with contextlib.suppress(UsageError):
            fh = find_home(fleet)
    if fh is not None and fh.settings.encrypt_models:
        encrypt = True
    recipients = None
    if encrypt or fleet_keys is not None:
        where = fleet_keys or (fh.root if fh is not None else None)
        if where is None:
            raise UsageError("--encrypt needs a fleet home with a fleet key, or --fleet-keys")
        recipients = publish_keys(where)
    reg = open_registry(home, passphrase_file=passphrase_file, fleet=fleet)
    rec = reg.push(package, encrypt_for=recipients)
    if read_manifest(package).fallback_threshold is None:
        warn_no_tau(f"{rec.name}@{rec.version}")
    if json_out:
        print_json(rec.as_dict())
    else:
        enc = f" encrypted for {', '.join(rec.encrypted_for)}" if rec.encrypted else ""
        console.print(f"pushed {rec.name}@{rec.version} sha256:{rec.sha256[:16]}… as "
                      f"{rec.target}{enc}")


@app.command("ls")
def ls(
    model: str | None = typer.Argument(None, help="Only this model."),
    home: Path = HOME,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List registered model versions with their metrics and lineage.

    Example: edgefleet registry ls digits-mlp --json
    """
    reg = open_registry(home)
    recs = reg.list(model)
    if json_out:
        print_json({"models": [r.as_dict() for r in recs]})
        return
    from rich import box

    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    for col in ("model", "version", "task", "accuracy", "parent", "MB", "pushed"):
        table.add_column(col, no_wrap=col in ("model", "version", "parent"),
                         justify="right" if col in ("accuracy", "MB") else "left")
    for r in recs:
        acc = accuracy(r.metrics)
        parent = r.lineage.get("parent") if isinstance(r.lineage, dict) else None
        table.add_row(r.name, r.version + (" (yanked)" if r.yanked else ""), r.task,
                      "-" if acc is None else f"{acc:.3f}", str(parent or "-"),
                      f"{r.size / 1e6:.1f}",
                      time.strftime("%Y-%m-%d", time.gmtime(r.pushed_at)))
    console.print(table)


@app.command()
def yank(
    ref: str = typer.Argument(..., help="MODEL@VERSION to stop vouching for."),
    home: Path = HOME,
    passphrase_file: Path | None = PASSPHRASE_FILE,
) -> None:
    """Remove a version from the signed targets: devices refuse it from the next refresh on.

    Example: edgefleet registry yank digits-mlp@1.0.0
    """
    from edgefleet.server.registry.repository import parse_ref

    reg = open_registry(home, passphrase_file=passphrase_file)
    name, version = parse_ref(ref)
    reg.yank(name, version)
    console.print(f"yanked {name}@{version}")


@app.command()
def root(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write root.json."),
    home: Path = HOME,
) -> None:
    """Write the newest signed root.json: the trust anchor devices are provisioned with.

    Example: edgefleet registry root --out /etc/edgefleet/root.json
    """
    reg = open_registry(home)
    version = reg.repo.root().version
    out.write_bytes(reg.repo.root_bytes(version))
    console.print(f"wrote root v{version} to {out}")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    home: Path = HOME,
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8470, help="TCP port (0: any free port)."),
    refresh: float = typer.Option(3600.0, help="Re-sign the timestamp every this many seconds."),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Server certificate (PEM, "
                                         "chain) for HTTPS, e.g. from `edgefleet certs issue`."),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="Private key of --tls-cert."),
    client_ca: Path | None = typer.Option(
        None, "--client-ca", help="Require client certificates issued by this CA (mutual "
        "TLS; the fleet CA). Needs --clients."),
    clients: Path | None = typer.Option(
        None, "--clients", help="Allow-list of client certificate sha256 fingerprints, one "
        "per line, re-read when it changes (the fleet home's registry-clients.txt, which "
        "enroll and revoke rewrite)."),
    passphrase_file: Path | None = PASSPHRASE_FILE,
    metrics_port: int | None = METRICS_PORT_OPTION,
    metrics_host: str = METRICS_HOST_OPTION,
) -> None:
    """Serve TUF metadata and package archives over HTTP, or HTTPS, until interrupted.

    The timestamp key must be on this machine: the timestamp is re-signed every
    --refresh seconds so devices never see it expire. TUF protects integrity either way;
    HTTPS (--tls-cert/--tls-key, TLS 1.2+) also hides the models and which version each
    device fetches. Plain HTTP is meant for loopback and development.

    With --client-ca and --clients only enrolled devices may download: each shows the
    client certificate of its bundle, and a revoked device's is off the list at once.

    Example: edgefleet registry serve --host 0.0.0.0 --port 8470
    --tls-cert certs/registry.pem --tls-key certs/registry.key
    """
    import ssl

    from edgefleet.device.core.cli_support import err_console
    from edgefleet.device.core.errors import ConfigError, UsageError
    from edgefleet.server.registry.http import (
        ClientAllowList,
        RegistryServer,
        server_tls_context,
    )

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if (client_ca is None) != (clients is None):
        raise UsageError("--client-ca and --clients go together")
    if client_ca is not None and tls_cert is None:
        raise UsageError("--client-ca needs HTTPS (--tls-cert/--tls-key)")
    tls: ssl.SSLContext | None = None
    if tls_cert is not None and tls_key is not None:
        try:
            tls = server_tls_context(tls_cert, tls_key, client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate or key: {exc}",
                              path=str(tls_cert)) from None
    elif not _loopback(host):
        err_console.print(f"[yellow]warning:[/] serving plain HTTP on {host}: anyone on the "
                          "network sees the models and which version each device fetches "
                          "(pass --tls-cert/--tls-key)")
    reg = open_registry(home, passphrase_file=passphrase_file)
    reg.repo.refresh_timestamp()
    allow = ClientAllowList(clients) if clients is not None else None
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts, host, port, tls=tls,
                         clients=allow).start()
    console.print(f"serving {home} at {srv.url} (metadata: {srv.url}/metadata/)")
    start_metrics(metrics_port, metrics_host, srv.metrics)
    try:
        while True:
            time.sleep(refresh)
            reg.repo.refresh_timestamp()
    except KeyboardInterrupt:
        srv.stop()
