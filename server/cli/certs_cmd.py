"""``edgefleet certs``: the fleet CA, server certificates (SuperLink, registry), node keys."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["app"]

app = typer.Typer(help="The fleet CA: TLS certificates for the SuperLink and registry, node keys.",
                  no_args_is_help=True)


@app.command()
def init(
    out: Path = typer.Option(Path("certs"), "--out", "-o", help="Folder to write into."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="Names/IPs the SuperLink is reached at (repeat)."),
    nodes: int = typer.Option(0, "--nodes", min=0, help="SuperNode key pairs to create."),
    days: int = typer.Option(365, "--days", min=1, help="Validity of the certificates."),
    json_out: bool = typer.Option(False, "--json", help="Print the paths as JSON."),
) -> None:
    """Create a CA, a SuperLink certificate and SuperNode key pairs (EC P-384).

    Example: edgefleet certs init --out certs --host fl.example.org --nodes 3

    Then: flower-superlink --ssl-ca-certfile certs/ca.pem --ssl-certfile certs/server.pem
    --ssl-keyfile certs/server.key --enable-supernode-auth, and register each node with
    flwr supernode register certs/nodes/node-0.pub
    """
    from edgefleet.server.fleet.pki import init_certs

    paths = init_certs(out, hosts=host, nodes=nodes, days=days)
    info = {"ca": str(paths.ca), "server_cert": str(paths.server_cert),
            "server_key": str(paths.server_key),
            "node_keys": [str(p) for p in paths.node_keys],
            "node_public_keys": [str(paths.public_key(i)) for i in range(nodes)]}
    if json_out:
        print_json(info)
        return
    console.print(f"[green]created[/] CA {paths.ca}, SuperLink certificate {paths.server_cert} "
                  f"for {', '.join(host)}, {nodes} SuperNode key pair(s) in {out / 'nodes'}")


@app.command()
def issue(
    name: str = typer.Argument(..., help="Certificate name, e.g. registry: writes NAME.pem "
                                         "and NAME.key next to the CA."),
    ca_dir: Path = typer.Option(Path("certs"), "--ca-dir", help="Folder of `certs init` "
                                                                "(ca.pem, ca.key)."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="Names/IPs the server is reached at (repeat)."),
    days: int = typer.Option(365, "--days", min=1, help="Validity (capped by the CA's)."),
    json_out: bool = typer.Option(False, "--json", help="Print the paths as JSON."),
) -> None:
    """Sign another server certificate with the fleet CA (e.g. the registry's HTTPS).

    Example: edgefleet certs issue registry --ca-dir certs --host reg.example.org

    Then: edgefleet registry serve --tls-cert certs/registry.pem --tls-key certs/registry.key,
    and give devices certs/ca.pem as [updates] ca_file (fleet init --registry-ca).
    """
    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.fleet.pki import issue_server_cert

    for f in (ca_dir / "ca.pem", ca_dir / "ca.key"):
        if not f.is_file():
            raise UsageError(f"{f}: not found (run `edgefleet certs init --out {ca_dir}` first)")
    try:
        cert, key = issue_server_cert(ca_dir, name, host, days)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if json_out:
        print_json({"cert": str(cert), "key": str(key), "ca": str(ca_dir / "ca.pem"),
                    "hosts": host})
        return
    console.print(f"[green]issued[/] {cert} (key {key}) for {', '.join(host)}, "
                  f"signed by {ca_dir / 'ca.pem'}")
