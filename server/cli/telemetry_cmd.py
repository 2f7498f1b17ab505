"""``edgefleet telemetry tail``: the newest stored telemetry messages, optionally followed."""

from __future__ import annotations

import json
import time

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.server.cli.fleet_cmd import _store, db_option
from edgefleet.server.telemetry.rows import fmt_time

__all__ = ["app"]

app = typer.Typer(help="Look at stored telemetry messages.", no_args_is_help=True)


@app.command()
def tail(
    device: str | None = typer.Option(None, "--device", "-d", help="Only this device."),
    lines: int = typer.Option(20, "--lines", "-n", min=1, help="How many to show first."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new messages."),
    db: str | None = db_option(),
    json_out: bool = typer.Option(False, "--json",
                                  help="One JSON object {messages: [...]} (no --follow)."),
) -> None:
    """Print the newest telemetry messages (device, boot, seq, kind, summary).

    Example: edgefleet telemetry tail --device pi-07 -f
    """
    store = _store(db)
    msgs = store.messages(device=device, limit=lines, newest=True)
    if json_out:
        print_json({"messages": [{**m, "payload": json.loads(m["payload"])} for m in msgs]})
        return
    last = msgs[-1]["id"] if msgs else 0
    while True:
        for m in msgs:
            body = json.loads(m["payload"]).get("body", {})
            if m["kind"] == "metrics":
                lat = body.get("latency_ms") or {}
                drift = body.get("drift") or {}
                what = (f"inferences={body.get('inferences')} fallback={body.get('fallback')} "
                        f"degraded={body.get('degraded')} p95={lat.get('p95')} "
                        f"psi={drift.get('input_psi')}")
            else:
                what = json.dumps(body)[:120]
            console.print(f"{fmt_time(m['ts'])} {m['device']:16s} {m['boot'][:8]}#{m['seq']:<7d}"
                          f" {m['kind']:8s} {what}", highlight=False)
            last = m["id"]
        if not follow:
            return
        time.sleep(1.0)
        msgs = store.messages(device=device, after_id=last, limit=500)
