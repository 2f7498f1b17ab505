"""``edgefleet certs``: TLS certificates for the SuperLink and keys for SuperNodes."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.cli_support import console, print_json

__all__ = ["app"]

app = typer.Typer(help="Create the Flower SuperLink's TLS certificates and SuperNode keys.",
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
    from edgefleet.server.fl_certs import init_certs

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
