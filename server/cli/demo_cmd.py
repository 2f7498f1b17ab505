"""``edgefleet demo``: run a whole fleet on this machine and print what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.panel import Panel
from rich.table import Table

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["demo"]


def demo(
    devices: int = typer.Option(5, "--devices", "-n", min=2, max=50, help="Device agents."),
    rounds: int = typer.Option(3, "--rounds", "-r", min=1, help="Federated rounds."),
    task: str = typer.Option("digits", "--task", help="digits or vibration."),
    model: str = typer.Option("mlp", "--model", help="mlp: the whole fleet with the task's "
                              "built-in model; cnn: import a Keras CNN, fine-tune its head "
                              "with DP on shifted devices (in-process), then serve both "
                              "versions on up to 3 real agents (canary, promote)."),
    fleet: bool = typer.Option(True, "--fleet/--no-fleet",
                               help="--model cnn: also serve it on real agents (default)."),
    epsilon: float = typer.Option(8.0, "--epsilon", min=0.01, help="DP budget of the run."),
    rate: float = typer.Option(20.0, "--rate", min=0.1, help="Sensor frames/s per device."),
    stream: float = typer.Option(20.0, "--stream", min=0.0,
                                 help="Seconds of streaming after the rollout."),
    workdir: Path = typer.Option(Path("demo-out"), "--workdir",
                                 help="Logs, keys, stores and the HTML report go here."),
    arm_devices: int = typer.Option(0, "--arm-devices", min=0,
                                    help="Run the last N agents in emulated arm64 devices "
                                         "(cross/; root; see docs/arm64.md)."),
    tampered_update: bool = typer.Option(False, "--tampered-update",
                                         help="Also assign an update whose archive was "
                                              "corrupted after signing; devices refuse it."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Start broker, registry, ingest, scorer, SuperLink and N agents; train, roll out, report.

    Everything runs as real processes on loopback ports; Ctrl-C stops them all.
    Examples:
      edgefleet demo --devices 5 --rounds 3 --task digits
      edgefleet demo --devices 3 --arm-devices 2 --rounds 2 --tampered-update   # as root
      edgefleet demo --model cnn --devices 3 --rounds 4 --epsilon 3
      edgefleet demo --model cnn --no-fleet    # the fine-tuning only, no processes
    """
    if model not in ("mlp", "cnn"):
        raise typer.BadParameter(f"--model {model!r}: mlp or cnn")
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgefleet.server.demo.fleet import DemoOptions, run_demo

    opts = DemoOptions(devices=devices, rounds=rounds, task=task, epsilon=epsilon, rate=rate,
                       stream_s=stream, workdir=workdir, arm_devices=arm_devices,
                       tampered_update=tampered_update)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, disable=json_out) as bar:
        tid = bar.add_task("starting", total=None)
        last: list[str] = []

        def say(msg: str) -> None:
            if last and not json_out:
                bar.console.print(f"[green]✓[/] {last[-1]}")
            last.append(msg)
            bar.update(tid, description=msg)

        if model == "cnn":
            from edgefleet.server.demo.cnn import run_cnn_demo

            report = run_cnn_demo(workdir, devices, rounds, epsilon, say, on_fleet=fleet,
                                  rate=rate, stream_s=stream)
        else:
            report = run_demo(opts, say)
        say("done")
    if json_out:
        print_json(report)
        return
    if model == "cnn":
        _print_cnn_report(report)
        return
    _print_report(report)


def _print_cnn_report(r: dict[str, Any]) -> None:
    t = Table("device", "camera shift", "images stored", "held out", "ε spent", "imported",
              "DP fine-tuned",
              title=f"head fine-tuning at ε = {r['epsilon_target']:g} "
                    f"(devices spent up to {r['epsilon_spent']:.2f}), {r['rounds']} rounds")
    for row in r["per_device"]:
        t.add_row(row["device"], row["shift"], str(row["train"]), str(row["held_out"]),
                  f"{row['epsilon']:.2f}", _pct(row["accuracy_before"]),
                  _pct(row["accuracy_after"]))
    t.add_row("all", "", "", "", "", _pct(r["accuracy_before"]), _pct(r["accuracy_after"]))
    console.print(t)
    console.print(f"imported CNN on unshifted images: {_pct(r['accuracy_unshifted'])}; "
                  f"packages: {r['packages']['imported']} -> {r['packages']['fine_tuned']}")
    if r.get("fleet"):
        _print_cnn_fleet(r["fleet"])
    console.print("step times (s): " + ", ".join(f"{k}: {v}" for k, v in
                                                  r["timings_s"].items()))


def _print_cnn_fleet(f: dict[str, Any]) -> None:
    before, after = f["versions"]

    def acc(x: Any, n: int) -> str:
        return f"{_pct(x)} of {n}"

    t = Table("agent", "served", "inferences", f"{before} answered", f"{after} answered",
              f"same frames: {before} → {after}",
              title=f"on the fleet: {before} fleet-wide, {after} canary then promoted",
              caption="accuracy on the frames each sensor labelled; agent dev-0k has "
                      "device dev(k-1)'s camera")
    for row in f["per_agent"]:
        t.add_row(row["device"], " → ".join(row["served"]), str(row["inferences"]),
                  acc(row["accuracy_before"], row["labelled_before"]),
                  acc(row["accuracy_after"], row["labelled_after"]),
                  f"{_pct(row['same_frames_before'])} → {_pct(row['same_frames_after'])}"
                  f" of {row['same_frames']}")
    t.add_row("all", "", str(f["inferences"]), _pct(f["accuracy_before"]),
              _pct(f["accuracy_after"]),
              f"{_pct(f['same_frames_before'])} → {_pct(f['same_frames_after'])}")
    console.print(t)
    console.print("rollout: " + "; ".join(
        f"{e['event']} {e.get('model')}@{e.get('version')} on "
        f"{', '.join(e.get('devices') or []) if e['event'] == 'canary' else 'the fleet'}"
        f" ({e.get('status')})" for e in f["rollout"]))
    console.print(f"fleet work folder: {f['workdir']}")


def _num(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _print_report(r: dict[str, Any]) -> None:
    t = Table("round", "accuracy", "ε", "nodes", "declined (why)",
              title="federated training (DP)")
    for row in r["rounds"]:
        eps = row["epsilon"]
        why = row.get("declines") or {}
        t.add_row(str(row["round"]), f"{row['accuracy']:.4f}",
                  "—" if eps is None else f"{eps:.3f}", str(row["nodes"]),
                  ", ".join(f"{n} {k}" for k, n in sorted(why.items())) or "—")
    console.print(t)
    lat = r["latency_ms"]
    tel = r["telemetry"]
    lines = [
        f"devices {r['devices']}   inferences {r['inferences']}",
        f"answered locally {_pct(r['local_share'])}   by the cloud {_pct(r['fallback_share'])}"
        f"   degraded {_pct(r['degraded_share'])}",
        f"latency p50 {lat['p50'] or 0:.3f} ms   p99 {lat['p99'] or 0:.3f} ms",
        f"telemetry published {tel['published']}   stored {tel['stored']}   lost {tel['lost']}"
        f"   duplicated {tel['duplicated']}   (duplicates dropped at ingest "
        f"{tel['duplicates_dropped_at_ingest']}, still spooled {tel['pending']})",
    ]
    console.print(Panel("\n".join(lines), title="fleet"))
    ev = Table("rollout event", "model", "devices", "status", title="rollout")
    for e in r["rollout"]:
        ev.add_row(e["event"], f"{e.get('model')}@{e.get('version')}",
                   ", ".join(e.get("devices") or []) or "fleet", str(e.get("status")))
    console.print(ev)
    d = Table("device", "model", "inferences", "ε spent", "sensor shift", "input PSI",
              "confidence PSI")
    for row in r["per_device"]:
        drift = row.get("drift") or {}
        d.add_row(row["device"], row["model"], str(row["inferences"]),
                  "—" if row["epsilon"] is None else f"{row['epsilon']:.3f}",
                  row.get("shift") or "none", _num(drift.get("input_psi")),
                  _num(drift.get("confidence_psi")))
    console.print(d)
    alerts = r.get("alerts") or {}
    console.print("open alerts: " + (", ".join(f"{a['device']} {a['kind']}"
                                               for a in alerts.get("open", [])) or "none"))
    if r.get("device_data"):
        dd = Table("device", "samples", "serial", "local API", "scorer", "held out",
                   "accuracy before", "after", title="each device's own data")
        for row in r["device_data"]:
            src = row["by_source"]
            dd.add_row(row["device"], str(row["samples"]), str(src.get("serial", 0)),
                       str(src.get("api", 0)), str(src.get("scorer", 0)), str(row["held_out"]),
                       _pct(row["accuracy_before"]), _pct(row["accuracy_after"]))
        console.print(dd)
    if r.get("arm"):
        console.print("emulated arm64 devices: " + ", ".join(
            f"{k} ({v['machine']}, {v['variant']})" for k, v in r["arm"]["devices"].items()))
    if r.get("tampered"):
        t = r["tampered"]
        console.print(f"tampered update {t['ref']} refused by: {', '.join(t['refused_by'])}")
    console.print(f"HTML report: {r.get('html_report')}   work folder: {r['workdir']}")
    console.print("step times (s): " + ", ".join(f"{k}: {v}" for k, v in
                                                  r["timings_s"].items()))
