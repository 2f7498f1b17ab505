"""``edgefleet fleet ls|show|prune``, ``edgefleet alerts``, ``edgefleet report``: the fleet
store (``prune`` rolls old telemetry up into hourly rows).

Every command takes ``--db`` (a SQLite path or a ``postgresql://`` DSN; default
``$EDGEFLEET_DB``, else the fleet home's store, ``<home>/fleet.db``) and ``--home``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.home_opts import HOME_OPTION
from edgefleet.server.telemetry.rows import device_row, fmt_time, fmt_value

__all__ = ["alerts", "app", "db_option", "report"]

app = typer.Typer(help="The device registry: who is online, what they run, how they do.",
                  no_args_is_help=True)


def db_option() -> Any:
    """The shared ``--db`` option."""
    return typer.Option(None, "--db", envvar="EDGEFLEET_DB",
                        help="Fleet store: SQLite path or postgresql:// DSN (default: the "
                             "fleet home's, <home>/fleet.db).")


def _store(db: str | None, home: Path | None = None) -> Any:
    from edgefleet.server.cli.home_opts import store_target
    from edgefleet.server.telemetry.store import open_store

    return open_store(store_target(db, home))


def _seen(r: dict[str, Any]) -> str:
    """``online``, else how long ago it was last heard of (fits a narrow column)."""
    import time

    if r["online"]:
        return "online"
    if r["last_seen"] is None:
        return "never"
    ago = max(0.0, time.time() - r["last_seen"])
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if ago >= secs:
            return f"{ago // secs:.0f}{unit} ago"
    return f"{ago:.0f}s ago"


def _model(r: dict[str, Any]) -> str:
    if not r["model_version"]:
        return "-"
    return f"{r['model_name']}@{r['model_version']}" if r["model_name"] else r["model_version"]


#: ``fleet ls`` draws at most this many rows unless told otherwise (``--limit``, ``--all``).
LS_LIMIT = 200
#: Past this many rows the table is plain aligned text: rich measures and styles every
#: cell, which took 8 to 10 s for 10,000 devices (docs/bench/fleet-size.md).
RICH_ROWS = 500
_LS_COLUMNS = ("device", "seen", "model", "inf", "fallback", "degraded", "PSI", "ε")


def _ls_cells(r: dict[str, Any]) -> list[str]:
    return [r["device"], _seen(r), _model(r), str(r["inferences"]),
            fmt_value(r["fallback_rate"], True), fmt_value(r["degraded_rate"], True),
            fmt_value(r["drift"]), fmt_value(r["epsilon"])]


def _print_rich(title: str, rows: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left",
              pad_edge=False, collapse_padding=True)
    for col in _LS_COLUMNS:
        left = col in ("device", "model", "seen")
        t.add_column(col, justify="left" if left else "right", no_wrap=col == "model",
                     overflow="fold")
    for r in rows:
        cells = [escape(c) for c in _ls_cells(r)]
        cells[1] = f"[{'green' if r['online'] else 'red'}]{cells[1]}[/]"
        t.add_row(*cells)
    console.print(t)


def _print_plain(title: str, rows: list[dict[str, Any]]) -> None:
    """The same columns as aligned text, written at once (no per-cell layout or style)."""
    import sys

    table = [list(_LS_COLUMNS), *(_ls_cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(_LS_COLUMNS))]
    lines = [title]
    for row in table:
        lines.append(" ".join(c.ljust(w) if i < 3 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                     .rstrip())
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


@app.command("ls")
def ls(db: str | None = db_option(), home: Path | None = HOME_OPTION,
       json_out: bool = typer.Option(False, "--json", help="One JSON object: {devices: [...], "
                                     "total: N}; every matching device unless --limit."),
       limit: int | None = typer.Option(None, "--limit", min=1,
                                        help=f"At most N devices (table default {LS_LIMIT})."),
       show_all: bool = typer.Option(False, "--all", help="Every matching device in the table."),
       status: str | None = typer.Option(None, "--status", help="online or offline."),
       model: str | None = typer.Option(None, "--model", metavar="NAME[@VERSION]",
                                        help="Only devices running this model (version)."),
       sort: str = typer.Option("device", "--sort",
                                help="device (by id) or last_seen (newest first).")) -> None:
    """List the devices the ingest has heard of (the table: the first 200 unless --limit or
    --all; --json: all of them).

    Examples: edgefleet fleet ls;  edgefleet fleet ls --status offline --sort last_seen;
    edgefleet fleet ls --model digits-mlp@1.1.0 --all
    """
    from edgefleet.server.telemetry.rows import SORTS, STATUSES, select_rows

    if status is not None and status not in STATUSES:
        raise UsageError(f"--status {status!r}: expected one of {', '.join(STATUSES)}")
    if sort not in SORTS:
        raise UsageError(f"--sort {sort!r}: expected one of {', '.join(SORTS)}")
    if show_all and limit is not None:
        raise UsageError("--all and --limit: choose one")
    rows = select_rows([device_row(d) for d in _store(db, home).devices()], status=status,
                       model=model, sort=sort)
    total = len(rows)
    if limit is None and not show_all and not json_out:
        limit = LS_LIMIT
    shown = rows[:limit] if limit is not None else rows
    if json_out:
        print_json({"devices": shown, "total": total})
        return
    title = (f"{total} devices" if len(shown) == total
             else f"{len(shown)} of {total} devices")
    (_print_rich if len(shown) <= RICH_ROWS else _print_plain)(title, shown)
    if len(shown) < total:
        console.print(f"… {total - len(shown)} more, use --limit N or --all, or filters "
                      "(--status, --model)", highlight=False)


@app.command()
def show(device: str = typer.Argument(..., help="Device id."), db: str | None = db_option(),
         home: Path | None = HOME_OPTION,
         json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Everything the store knows about one device: registry row, latest report, events.

    Example: edgefleet fleet show pi-07
    """
    store = _store(db, home)
    d = store.device(device)
    if d is None:
        raise UsageError(f"unknown device {device!r} (see `edgefleet fleet ls`)")
    events = store.events(device=device, limit=20)
    if json_out:
        print_json({"device": {**device_row(d), **d}, "events": events})
        return
    r = device_row(d)
    console.print(f"[bold]{device}[/]  {'[green]online[/]' if r['online'] else '[red]offline[/]'}"
                  f"  last seen {fmt_time(r['last_seen'])}  model {r['model_name'] or '-'} "
                  f"{r['model_version'] or ''}")
    console.print(f"inferences {r['inferences']}  fallback {fmt_value(r['fallback_rate'], True)}  "
                  f"degraded {fmt_value(r['degraded_rate'], True)}  drift {fmt_value(r['drift'])}  "
                  f"ε {fmt_value(r['epsilon'])}  messages {d['messages']} "
                  f"(duplicates dropped {d['duplicates']})  spool dropped {d['spool_dropped']}")
    body = d["last_metrics"] or {}
    lat = body.get("latency_ms") or {}
    if lat:
        console.print(f"latency p50 {fmt_value(lat.get('p50'))} ms  "
                      f"p95 {fmt_value(lat.get('p95'))} ms  p99 {fmt_value(lat.get('p99'))} ms")
    sysinfo = body.get("system") or {}
    if sysinfo:
        console.print("system " + "  ".join(f"{k} {v}" for k, v in sysinfo.items()
                                            if v is not None))
    for e in events:
        console.print(f"  {fmt_time(e['ts'])}  {e['kind']:24s} {e['message']}")


@app.command()
def prune(db: str | None = db_option(), home: Path | None = HOME_OPTION,
          keep_raw: str = typer.Option("7d", "--keep-raw",
                                       help="Keep raw messages this long (e.g. 7d, 48h)."),
          keep_hourly: str = typer.Option("90d", "--keep-hourly",
                                          help="Keep the hourly roll-up this long."),
          batch: int = typer.Option(5_000, "--batch", min=1,
                                    help="Messages per transaction (the ingest waits at "
                                         "most one batch)."),
          json_out: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Roll raw telemetry older than --keep-raw up into hourly rows per device, delete it,
    and delete hourly rows older than --keep-hourly. Safe to run while the ingest runs,
    to interrupt, and to run again (from cron or a systemd timer).

    Example: edgefleet fleet prune --keep-raw 7d --keep-hourly 90d
    """
    from edgefleet.server.telemetry.retention import parse_age
    from edgefleet.server.telemetry.retention import prune as run_prune

    raw, hourly = parse_age(keep_raw), parse_age(keep_hourly)
    result = run_prune(_store(db, home), keep_raw=raw, keep_hourly=hourly, batch=batch)
    if json_out:
        print_json(result.as_dict())
        return
    console.print(f"rolled up and deleted {result.rolled_up} raw messages in "
                  f"{result.batches} batches; deleted {result.hourly_deleted} hourly rows; "
                  f"{result.hourly_rows} hourly rows kept")


def alerts(db: str | None = db_option(), home: Path | None = HOME_OPTION,
           limit: int = typer.Option(50, "--limit", min=1, help="How many recent events."),
           json_out: bool = typer.Option(False, "--json", help="One JSON object."),
           ack: str | None = typer.Option(None, "--ack", metavar="DEVICE:KIND",
                                          help="Acknowledge an open alert (audit-logged)."),
           registry: Path | None = typer.Option(
               None, "--registry", envvar="EDGEFLEET_REGISTRY",
               help="Registry folder whose audit log records --ack (default: the fleet "
                    "home's).")
           ) -> None:
    """Open alerts (drift, fallback/degraded rate, silent devices) and recent alert events.

    Examples: edgefleet alerts --json;  edgefleet alerts --ack pi-07:drift
    """
    from rich.table import Table

    store = _store(db, home)
    if ack is not None:
        import getpass

        from edgefleet.server.cli.home_opts import registry_path
        from edgefleet.server.fleet.audit import AuditLog
        from edgefleet.server.telemetry.alerts import acknowledge

        device, sep, kind = ack.rpartition(":")
        if not sep or not device or not kind:
            raise UsageError(f"--ack {ack!r}: expected DEVICE:KIND")
        acknowledge(store, AuditLog(registry_path(registry, home) / "audit.jsonl"), device, kind,
                    getpass.getuser())
    open_ = store.open_alerts()
    events = [e for e in store.events(limit=limit * 4)
              if e["kind"].startswith(("alert.", "resolved."))][:limit]
    if json_out:
        print_json({"open": open_, "events": events})
        return
    t = Table(title=f"{len(open_)} open alerts")
    for col in ("device", "alert", "since"):
        t.add_column(col)
    for a in open_:
        t.add_row(a["device"], a["kind"], fmt_time(a["since"]))
    console.print(t)
    for e in events:
        colour = "yellow" if e["kind"].startswith("alert.") else "green"
        console.print(f"  {fmt_time(e['ts'])}  {e['device'] or '-':16s} [{colour}]{e['kind']}[/]"
                      f"  {e['message']}")


def report(out: Path = typer.Option(..., "--out", help="Folder for index.html and PNGs."),
           db: str | None = db_option(), home: Path | None = HOME_OPTION,
           limit: int = typer.Option(20_000, "--limit", min=1,
                                     help="Metrics messages to read (newest)."),
           fl_db: Path | None = typer.Option(
               None, "--fl-db", help="FL store (fl.db in `edgefleet train --work-dir`): adds "
               "accuracy per device (min, median, max, worst) of recent federated runs."),
           json_out: bool = typer.Option(False, "--json", help="Print what was written.")
           ) -> None:
    """Write an HTML fleet report with latency, confidence, fallback and drift plots.

    Example: edgefleet report --out out/report && xdg-open out/report/index.html

    With federated runs: edgefleet report --out out/report --fl-db .edgefleet/fl/fl.db
    """
    from edgefleet.server.telemetry.report import write_report

    written = write_report(_store(db, home), out, limit=limit, fl_db=fl_db)
    if json_out:
        print_json({"report": str(written), "files": sorted(p.name for p in out.iterdir())})
        return
    console.print(f"[green]wrote[/] {written}")
