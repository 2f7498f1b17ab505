"""Fleet-size federated rounds: Flower's simulation runtime (Ray) next to the in-process grid.

The same ServerApp (``edgefleet.server.fl.server_app.main``: FleetStrategy over Flower's
FedAvg, server-side evaluation, ``fl.db``) and the same ClientApp
(``edgefleet.models.sim.fl_app:app``: sample-level DP-SGD, σ calibration, a privacy
ledger per device, the device's policy) run over N = 100, 1,000 and 10,000 virtual
devices, 100 sampled per round (``fraction = 100/N``, ``min-nodes = 100``), on two
engines in turn:

* ``simulation``: :func:`edgefleet.server.fl.simulation.run_simulation`, i.e. what
  ``edgefleet train --simulate N`` runs: Flower's simulation runtime on a local Ray
  (``--ray-cpus``, default 2: one ClientApp actor per CPU);
* ``in-process``: :class:`edgefleet.server.fl.inprocess.InProcessGrid`, one process, the
  ClientApp called in turn.

Each (engine, N) runs in its own child process; this script samples the memory of the
child's whole process tree (Ray's GCS, raylet and actor processes included) from
``/proc`` every 0.5 s: peak sum of RSS and of PSS (PSS splits shared pages, so it does not
count a shared library once per process). Seconds per round are the ServerApp's own
(``fl.db``, between consecutive server-side evaluations). Linux only.

Run: ``python scripts/bench_fl_simulation.py [--sizes 100,1000,10000] [--rounds 3]
[--sample 100] [--ray-cpus 2]``; writes docs/bench/fl-simulation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

ENGINES = ("simulation", "in-process")


def settings_for(n: int, sample: int, rounds: int, work: Path) -> dict[str, Any]:
    """The run config: a per-round sample of ``sample`` devices, as a fleet-size run does."""
    k = min(n, sample)
    return {"tag": f"bench-{n}", "num-rounds": rounds, "dp": "sample", "epsilon": 3.0,
            "fraction": k / n, "min-nodes": k, "num-nodes": n, "local-steps": 5,
            "batch-size": 64, "pretrain-epochs": 5, "round-timeout": 3600.0,
            "db": str(work / "fl.db"), "out": ""}


def one(engine: str, n: int, sample: int, rounds: int, ray_cpus: int, work: Path) -> None:
    """Child: run one configuration, print its rounds as JSON on stdout's last line."""
    from edgefleet.server.cli.train_cmd import embedded_policy
    from edgefleet.server.fl.settings import run_settings
    from edgefleet.server.fl.simulation import DEFAULT_SHARES, VirtualNodes, run_simulation
    from edgefleet.server.fl.store import FlStore

    s = run_settings(settings_for(n, sample, rounds, work))
    nodes = VirtualNodes(root=str(work / "nodes"), shares=min(n, DEFAULT_SHARES),
                         common=embedded_policy("sample", 3.0))
    t0 = time.monotonic()
    if engine == "simulation":
        run_simulation(s, n, nodes, num_cpus=ray_cpus)
    else:
        from flwr.app import Context, RecordDict

        from edgefleet.models.sim.fl_app import app as client_app
        from edgefleet.server.fl import server_app
        from edgefleet.server.fl.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, n, nodes.config)
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={},
                                      state=RecordDict(), run_config=s.flower_config()))
    wall = time.monotonic() - t0
    store = FlStore(Path(s.db))
    run = store.run(s.tag)
    rows = [{"round": r.round, "seconds": r.seconds, "nodes": r.nodes, "declined": r.declined,
             "failed": r.failed, "accuracy": r.accuracy, "epsilon": r.epsilon}
            for r in store.rounds(s.tag)]
    print(json.dumps({"wall": wall, "status": run.status if run else None, "rounds": rows}))


def _tree(root: int) -> list[int]:
    """``root`` and every process below it (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB (0, 0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line and " kB" in line)
        return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _name(pid: int) -> str:
    """A process's command name (Ray names its actors ``ray::ClientAppActor``)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def measure(engine: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a child process; peak memory of its tree, its rounds."""
    work = Path(tempfile.mkdtemp(prefix=f"fl-sim-{engine}-{n}-"))
    load_before = os.getloadavg()[0]
    with open(work / "child.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "--one", engine, "--n", str(n), "--sample",
             str(args.sample), "--rounds", str(args.rounds), "--ray-cpus", str(args.ray_cpus),
             "--work", str(work)], stdout=subprocess.PIPE, stderr=log, text=True)
        peak: dict[str, Any] = {"rss": 0, "pss": 0, "procs": 0, "by_process": {}}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                pids = _tree(child.pid)
                mem = [_memory_kb(p) for p in pids]
                peak["rss"] = max(peak["rss"], sum(m[0] for m in mem))
                peak["procs"] = max(peak["procs"], len(pids))
                if sum(m[1] for m in mem) > peak["pss"]:
                    peak["pss"] = sum(m[1] for m in mem)
                    by: dict[str, int] = {}
                    for pid, m in zip(pids, mem, strict=True):
                        by[_name(pid)] = by.get(_name(pid), 0) + m[1] // 1024
                    peak["by_process"] = by

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, _ = child.communicate()
        done.set()
        sampler.join()
    if child.returncode:
        raise SystemExit(f"{engine} N={n} failed ({child.returncode}); see {work}/child.log")
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    res.update(engine=engine, n=n, sample=args.sample, peak_rss_mb=peak["rss"] / 1024,
               peak_pss_mb=peak["pss"] / 1024, procs=peak["procs"],
               pss_by_process_mb=peak["by_process"], load_before=load_before,
               load_after=os.getloadavg()[0])
    print(json.dumps(res), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return res


def _row(r: dict[str, Any]) -> list[object]:
    rounds = [x for x in r["rounds"] if x["round"] > 0]
    later = [x["seconds"] for x in rounds[1:]]
    mean_later = sum(later) / len(later) if later else float("nan")
    sampled = {x["nodes"] + x["declined"] + x["failed"] for x in rounds}
    return [f"{r['n']:,}", r["engine"], "/".join(str(s) for s in sorted(sampled)),
            f"{rounds[0]['seconds']:.1f}", f"{mean_later:.1f}", f"{r['wall']:.0f}",
            f"{r['peak_rss_mb']:.0f}", f"{r['peak_pss_mb']:.0f}", r["procs"],
            f"{rounds[-1]['accuracy']:.3f}", f"{r['load_before']:.1f} / {r['load_after']:.1f}"]


def main() -> None:
    """Measure every (N, engine), then write docs/bench/fl-simulation.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100,1000,10000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sample", type=int, default=100)
    p.add_argument("--ray-cpus", type=int, default=2)
    p.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rows", type=Path, help="re-render the section from the JSON rows a "
                   "run printed (one per line), without measuring")
    args = p.parse_args()
    if args.one:
        one(args.one, args.n, args.sample, args.rounds, args.ray_cpus, args.work)
        return
    if args.rows:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines()
                if line.startswith("{")]
        write([{"sample": args.sample, **r} for r in rows], args)
        return
    results: list[dict[str, Any]] = []
    for n in args.sizes.split(","):
        for engine in ENGINES:
            results.append(measure(engine, int(n), args))
            write(results, args)  # what is measured so far survives a later failure


def _later(r: dict[str, Any]) -> float:
    """Mean seconds of the rounds after the first (no start-up, no first calibration)."""
    later = [x["seconds"] for x in r["rounds"] if x["round"] > 1]
    return sum(later) / len(later) if later else float("nan")


def _analysis(results: list[dict[str, Any]]) -> str:
    """What the rows say, computed from them: per-message cost, memory per device."""
    by = {(r["engine"], r["n"]): r for r in results}
    sizes = sorted({r["n"] for r in results})
    lines = []
    for n in sizes:
        sim, inp = by.get(("simulation", n)), by.get(("in-process", n))
        if sim and inp:
            msgs = 2 * min(n, sim["sample"])  # a train and an evaluate message per device
            lines.append(f"* N={n:,}: later rounds {_later(sim) / _later(inp):.1f}x the "
                         f"in-process grid's; {1000 * _later(sim) / msgs:.0f} ms per "
                         f"message on the simulation runtime, "
                         f"{1000 * _later(inp) / msgs:.0f} ms in process.")
    sims = [by[("simulation", n)] for n in sizes if ("simulation", n) in by]
    if len(sims) > 1 and sims[-1]["n"] > sims[0]["n"]:
        per = ((sims[-1]["peak_pss_mb"] - sims[0]["peak_pss_mb"]) * 1024
               / (sims[-1]["n"] - sims[0]["n"]))
        lines.append(f"* Simulation memory grows by about {per:.0f} kB of PSS per extra "
                     f"virtual device ({sims[0]['n']:,} → {sims[-1]['n']:,}); the rest is "
                     "fixed: at the peak, " + ", ".join(
                         f"{k} {v} MB" for k, v in sorted(
                             sims[-1]["pss_by_process_mb"].items(), key=lambda kv: -kv[1]))
                     + " (PSS, summed per process name).")
    return "\n".join(lines)


def write(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """docs/bench/fl-simulation.md from the rows measured so far."""
    table = md_table(["devices", "engine", "sampled per round", "round 1, s",
                      "later rounds, s (mean)", "whole run, s", "peak RSS, MB",
                      "peak PSS, MB", "processes", "accuracy", "load avg before / after"],
                     [_row(r) for r in results])
    body = f"""
Run: `python scripts/bench_fl_simulation.py --sizes {args.sizes} --rounds {args.rounds}
--sample {args.sample} --ray-cpus {args.ray_cpus}` (one child process per row, rows in
turn, on a machine shared with other jobs: the load average is printed per row).

The same ServerApp and ClientApp (sample-level DP at ε=3, 5 local steps, batch 64, each
device's own state folder, σ calibration and privacy ledger, its policy) over N virtual
devices, {args.sample} sampled per round, {args.rounds} rounds. `simulation` is
`edgefleet train --simulate N` (Flower's simulation runtime, a local Ray with
{args.ray_cpus} CPUs: {args.ray_cpus} ClientApp actors); `in-process` is the
`InProcessGrid` (one process, the ClientApp called in turn). Round 1 includes Ray's
start-up and each sampled device's first σ calibration; memory is the peak over the
whole process tree.

{table}

{_analysis(results)}
"""
    print(write_section("fl-simulation", "Federated rounds at fleet size: Flower simulation "
                        "vs the in-process grid", body))


if __name__ == "__main__":
    main()
