"""``edgefleet audit``: the hash-chained log of registry, rollout and key events."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.registry_cmd import HOME

__all__ = ["app"]

app = typer.Typer(help="The append-only audit log: verify it, show it.", no_args_is_help=True)


@app.command()
def verify(
    home: Path = HOME,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check every entry's hash chain; exit 66 naming the first edited or removed entry.

    Example: edgefleet audit verify --registry /srv/registry
    """
    from edgefleet.server.cli.home_opts import registry_path
    from edgefleet.server.fleet.audit import AuditLog

    report = AuditLog(registry_path(home, None) / "audit.jsonl").verify()
    if json_out:
        print_json({"ok": True, "entries": report.entries, "head": report.head})
    else:
        console.print(f"ok: {report.entries} entries, head {report.head[:16]}…")


@app.command()
def show(
    home: Path = HOME,
    limit: int = typer.Option(20, help="Newest N entries."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Print the newest entries (unverified: run audit verify for that).

    Example: edgefleet audit show --limit 5
    """
    from edgefleet.server.cli.home_opts import registry_path
    from edgefleet.server.fleet.audit import AuditLog

    entries = AuditLog(registry_path(home, None) / "audit.jsonl").entries()[-limit:]
    if json_out:
        print_json({"entries": entries})
        return
    for e in entries:
        console.print(f"{e['seq']:>5} {e['time']} {e['actor']:<10} {e['action']:<18} "
                      f"{e['details']}", highlight=False)
