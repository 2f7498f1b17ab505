"""``edgefleet server up|status|down|units``: every fleet service from the fleet home.

``up`` starts a detached supervisor (``server supervise``) that runs mosquitto (generated
config), the SuperLink, the registry, the ingest, the scorer and the rollout guard with
restart budgets and logs under ``<home>/logs``; ``units`` writes systemd units for the
same command lines instead. Each service still runs on its own (``edgefleet ingest run
--home ...``) for operators who split them over machines.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.device.core.cli_support import console, print_json
from edgefleet.device.core.errors import EdgefleetError, UsageError

__all__ = ["HOME_OPTION", "app"]

app = typer.Typer(help="Run the fleet's services from the fleet home: up, status, down, "
                       "units (systemd).", no_args_is_help=True)

HOME_OPTION = typer.Option(None, "--home", envvar="EDGEFLEET_HOME",
                           help="Fleet home folder (default: ~/.local/share/edgefleet).")


class ServerError(EdgefleetError):
    """A service did not come up; the message names it and ends with its log."""

    exit_code = 70


def _home(home: Path | None) -> Any:
    from edgefleet.server.fleet.home import FleetHome

    return FleetHome(home)


def _table(status: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table("service", "state", "pid", "restarts", "port", "log")
    colours = {"up": "green", "failed": "red", "stopped": "red"}
    for name, s in status["services"].items():
        colour = colours.get(s["state"], "yellow")
        t.add_row(name, f"[{colour}]{s['state']}[/]", str(s["pid"] or "-"), str(s["restarts"]),
                  str(s["port"] or "-"), s["log"], )
    console.print(t)


def _all_up(status: dict[str, Any] | None, pid: int) -> bool:
    return bool(status and status.get("pid") == pid and not status.get("stopped")
                and all(s["state"] == "up" for s in status["services"].values()))


@app.command()
def up(home: Path | None = HOME_OPTION,
       timeout: float = typer.Option(120.0, "--timeout", min=1.0,
                                     help="Seconds to wait for every service."),
       json_out: bool = typer.Option(False, "--json", help="Print the status as JSON.")
       ) -> None:
    """Start every service of the fleet home and wait until each one is up.

    The services keep running after this command returns (a supervisor restarts each one
    within its restart budget); `edgefleet server down` stops them.

    Example: edgefleet server up && edgefleet server status
    """
    from edgefleet.device.core.process import Child
    from edgefleet.server.fleet.services import BIN, plan, write_mosquitto_conf
    from edgefleet.server.fleet.supervisor import read_status, server_pid

    h = _home(home)
    plan(h)  # a missing certificate or registry fails here, before anything starts
    write_mosquitto_conf(h)
    pid = server_pid(h)
    if pid is None:
        (h.run_dir / "status.json").unlink(missing_ok=True)
        child = Child.start("server", [str(BIN / "edgefleet"), "server", "supervise",
                                       "--home", str(h.root)],
                            log_path=h.logs_dir / "server.log",
                            env={"EDGEFLEET_HOME": str(h.root)})
        end = time.monotonic() + timeout
        while True:
            status = read_status(h)
            if _all_up(status, child.pid):
                break
            failed = [n for n, s in (status or {}).get("services", {}).items()
                      if s["state"] == "failed"]
            if not child.alive() or failed or time.monotonic() > end:
                child.stop(30)
                why = (f"{failed[0]} keeps exiting" if failed else
                       "the supervisor exited" if child.returncode not in (0, -15) else
                       f"not every service was up after {timeout:g} s")
                raise ServerError(f"server up failed: {why}; {_tails(h, status)}")
            time.sleep(0.3)
        pid = child.pid
    status = read_status(h) or {"services": {}}
    if json_out:
        print_json({"pid": pid, **status})
        return
    console.print(f"[green]fleet server up[/] (supervisor pid {pid}, home {h.root})")
    _table(status)


def _tails(h: Any, status: dict[str, Any] | None) -> str:
    from edgefleet.device.core.process import log_tail

    bad = [n for n, s in (status or {}).get("services", {}).items() if s["state"] != "up"]
    name = bad[0] if bad else "server"
    tail = log_tail(h.root / "logs" / f"{name}.log", 8)
    return f"{name}'s log ends:\n{tail}" if tail else f"see {h.root / 'logs'}"


@app.command()
def status(home: Path | None = HOME_OPTION,
           json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")
           ) -> None:
    """Show each service: state (up, starting, restarting, failed), pid, restarts, log.

    Exit 0 when every service is up, 1 otherwise.

    Example: edgefleet server status --json
    """
    from edgefleet.server.fleet.supervisor import read_status, server_pid

    h = _home(home)
    pid = server_pid(h)
    st = read_status(h) if pid is not None else None
    running = st is not None and _all_up(st, pid or -1)
    if json_out:
        print_json({"running": pid is not None, "pid": pid, "all_up": running,
                    "services": (st or {}).get("services", {})})
    elif st is None:
        console.print(f"fleet server not running (home {h.root}); start it: "
                      "edgefleet server up")
    else:
        console.print(f"fleet server running (supervisor pid {pid})")
        _table(st)
    if not running:
        raise typer.Exit(1)


@app.command()
def down(home: Path | None = HOME_OPTION,
         timeout: float = typer.Option(60.0, "--timeout", min=1.0,
                                       help="Seconds to wait for the services to stop.")
         ) -> None:
    """Stop every service `edgefleet server up` started (SIGTERM, newest first).

    Example: edgefleet server down
    """
    from edgefleet.server.fleet.supervisor import server_pid

    h = _home(home)
    pid = server_pid(h)
    if pid is None:
        console.print("fleet server not running")
        return
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while server_pid(h) == pid:
        if time.monotonic() > end:
            raise ServerError(f"the supervisor (pid {pid}) did not stop in {timeout:g} s; "
                              f"see {h.root / 'logs' / 'server.log'}")
        time.sleep(0.2)
    console.print("fleet server stopped")


@app.command(hidden=True)
def supervise(home: Path | None = HOME_OPTION) -> None:
    """Run every service in the foreground until SIGTERM (what `server up` starts)."""
    from edgefleet.server.fleet.supervisor import FleetServer, server_pid

    h = _home(home)
    if server_pid(h) is not None:
        raise UsageError(f"a fleet server already runs for {h.root}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    FleetServer(h).run(stop)


@app.command()
def units(out: Path = typer.Option(..., "--out", "-o",
                                   help="Folder for the unit files (e.g. /etc/systemd/system)."),
          home: Path | None = HOME_OPTION,
          json_out: bool = typer.Option(False, "--json", help="Print the files written.")
          ) -> None:
    """Write systemd units for the services `server up` would run, and the broker config.

    One unit per service (Restart=on-failure within the same restart budget, logs
    appended to <home>/logs/NAME.log) and edgefleet-server.target that starts them all.

    Example: sudo edgefleet server units --out /etc/systemd/system &&
    sudo systemctl daemon-reload && sudo systemctl enable --now edgefleet-server.target
    """
    from edgefleet.server.fleet.services import plan, systemd_units, write_mosquitto_conf

    h = _home(home)
    services = plan(h)
    write_mosquitto_conf(h)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in systemd_units(h, services).items():
        (out / name).write_text(text)
        written.append(str(out / name))
    if json_out:
        print_json({"units": written})
        return
    for path in written:
        console.print(f"wrote {path}")
    console.print("then: systemctl daemon-reload && systemctl enable --now "
                  "edgefleet-server.target")
