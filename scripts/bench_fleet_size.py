"""The server's other paths at fleet size: TUF refreshes, the rollout guard, the store.
Writes docs/bench/fleet-size.md.

    .venv/bin/python scripts/bench_fleet_size.py [--devices 1000] [--store-devices 500]
        [--hours 24] [--registry-devices 10000]

a. the registry (RegistryServer over real HTTP, a real TUF repository) answering the
   refreshes of ``--devices`` virtual devices, each a real TufClient (python-tuf's
   ngclient) with its own metadata folder, from 2 processes x 16 threads: a first
   refresh (root, timestamp, snapshot, targets) and a steady one (timestamp only);
b. the rollout guard's view (FleetView on a real mosquitto) taking the retained update
   states of ``--devices`` devices, each published over its own connection, and the
   guard's check of a canary over all of them;
c. the fleet store on SQLite and PostgreSQL: ``--store-devices`` devices x ``--hours``
   of metrics at one a minute (real ~1 KB envelopes) plus ``--registry-devices`` rows in
   the device registry: insert rate, size, `fleet ls` and report times, and
   `fleet prune` (all but the newest 3 hours rolled up), size before and after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support

from bench_common import md_table, write_section  # type: ignore[import-not-found]

from edgefleet.device.updates.tuf_client import TufClient, TufClientConfig
from edgefleet.server.fleet.broker import MosquittoBroker
from edgefleet.server.registry.http import RegistryHandler, RegistryServer
from edgefleet.server.telemetry.loadgen import metrics_body_template
from edgefleet.server.telemetry.retention import prune
from edgefleet.server.telemetry.store import Store, open_store
from tests.support.postgres import postgres_server
from tests.support.updates import make_registry

BIN = Path(sys.executable).parent
HOUR = 3600.0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- a. TUF refreshes --------------------------------------------------------------------------
def _refresh_share(args: tuple[str, bytes, str, list[int], int]) -> list[tuple[float, float]]:
    """One process: refresh each of its devices once from ``threads`` threads; returns
    (latency s, finish wall time) per device."""
    url, root, state, ids, threads = args
    cfg = TufClientConfig(f"{url}/metadata/", f"{url}/targets/", socket_timeout_s=60)

    def one(i: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        TufClient(Path(state) / f"d{i}", cfg, root).refresh()
        return time.perf_counter() - t0, time.time()

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(one, ids))


def bench_registry(tmp: Path, devices: int, procs: int, threads: int) -> dict[str, Any]:
    reg = make_registry(tmp / "registry")
    counts = {"n": 0}
    lock = threading.Lock()

    class Counting(RegistryHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with lock:
                counts["n"] += 1
            super().do_GET()

    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts, handler=Counting).start()
    root = reg.repo.root_bytes(1)
    out: dict[str, Any] = {"cap": srv.limits.max_connections}
    try:
        shares = [list(range(p, devices, procs)) for p in range(procs)]
        ctx = mp.get_context("fork")
        for phase in ("first", "steady"):
            counts["n"] = 0
            t0 = time.time()
            with ctx.Pool(procs) as pool:
                res = pool.map(_refresh_share, [(srv.url, root, str(tmp / "devices"), ids,
                                                 threads) for ids in shares])
            lat = [x[0] for r in res for x in r]
            wall = max(x[1] for r in res for x in r) - t0
            out[phase] = {"refreshes": len(lat), "requests": counts["n"], "wall": wall,
                          "req_s": counts["n"] / wall, "refresh_s": len(lat) / wall,
                          "p50": pct(lat, 0.5) * 1000, "p99": pct(lat, 0.99) * 1000}
            print(f"registry {phase}: {out[phase]}", flush=True)
        out["refused"] = srv.guard.refused if hasattr(srv.guard, "refused") else None
    finally:
        srv.stop()
        reg.close()
    return out


# -- b. the rollout guard --------------------------------------------------------------------
def _publish(port: int, names: list[str], messages: Any) -> None:
    """Each device connects, publishes ``messages(name)`` (topic, body, retain) at QoS 1 and
    waits for the PUBACKs."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    for k in range(0, len(names), 100):  # 100 connections open at once
        clients = []
        for name in names[k:k + 100]:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
            c.connect("127.0.0.1", port)
            infos = [c.publish(topic, json.dumps(body), qos=1, retain=retain)
                     for topic, body, retain in messages(name)]
            clients.append((c, infos))
        end = time.monotonic() + 120
        while not all(i.is_published() for _, infos in clients for i in infos):
            assert time.monotonic() < end, "the broker did not acknowledge the messages"
            for c, infos in clients:
                if not all(i.is_published() for i in infos):
                    c.loop(0.001)
        for c, _ in clients:
            c.disconnect()


def _state(name: str, model: str, version: str) -> list[tuple[str, dict[str, Any], bool]]:
    """A device's retained update state: running ``version``, healthy."""
    from edgefleet.device.wire.updates import state_topic

    return [(state_topic(name), {"device": name, "model": model, "version": version,
                                 "health": {"inferences": 500, "errors": 0, "degraded": 3,
                                            "fallback": 10}, "ts": time.time()}, True)]


def _events(name: str, n: int) -> list[tuple[str, dict[str, Any], bool]]:
    """``n`` routine (not retained) update events of a device."""
    from edgefleet.device.wire.updates import event_topic

    return [(event_topic(name), {"device": name, "event": "installed", "ts": time.time()},
             False) for _ in range(n)]


def _checks(ctl: Any, rid: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = ctl.check(ctl.get(rid))
        times.append(time.perf_counter() - t0)
        assert got.status == "running", got.reason
    return times


def bench_guard(tmp: Path, devices: int) -> dict[str, Any]:
    from edgefleet.models.build.pipeline import BuildOptions, build_package
    from edgefleet.server.rollout.controller import RolloutController
    from edgefleet.server.rollout.fleet_view import EVENTS_KEPT, FleetView
    from tests.support.updates import package_version

    reg = make_registry(tmp / "rollreg")
    pkg = build_package(BuildOptions(task="digits", out=tmp / "pkg", formats="onnx"))
    old = reg.push(package_version(pkg.path, tmp / "p1", "1.0.0"))
    new = reg.push(package_version(pkg.path, tmp / "p2", "1.1.0"))
    broker = MosquittoBroker(tmp / "broker").start()
    names = [f"pi-{i:05d}" for i in range(devices)]
    out: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        _publish(broker.port, names, lambda n: _state(n, new.name, new.version))
        out["publish_s"] = time.perf_counter() - t0
        tracemalloc.start()
        rss0 = rss_mb()
        t0 = time.perf_counter()
        view = FleetView("127.0.0.1", broker.port)
        while len(view.fleet(0.0)) < devices and time.perf_counter() - t0 < 120:
            time.sleep(0.005)
        out["view_s"] = time.perf_counter() - t0
        out["states"] = len(view.fleet(0.0))
        out["view_mb"] = tracemalloc.get_traced_memory()[0] / 2**20
        out["rss_mb"] = rss_mb() - rss0
        tracemalloc.stop()
        ctl = RolloutController(reg, view, view)  # health from the update states
        # `rollout start --devices <all>`: one signed assignment per device; the states
        # already say the candidate (the devices installed it), the baseline is 1.0.0
        t0 = time.perf_counter()
        r = ctl.start(new.name, new.version, fleet=dict.fromkeys(names, old.version),
                      devices=names)
        out["start_s"] = time.perf_counter() - t0
        out["check_ms"] = pct(_checks(ctl, r.id, 5), 0.5) * 1000
        # a busy fleet: the view's event buffer full of routine events, sent by the devices
        per = EVENTS_KEPT // devices
        t0 = time.perf_counter()
        _publish(broker.port, names, lambda n: _events(n, per))
        while len(view.events) < per * devices and time.perf_counter() - t0 < 120:
            time.sleep(0.01)
        out["events"] = len(view.events)
        out["check_full_ms"] = pct(_checks(ctl, r.id, 3), 0.5) * 1000
        print(f"guard: {out}", flush=True)
        ctl.close()
        view.close()
    finally:
        broker.kill()
        reg.close()
    return out


# -- c. the store --------------------------------------------------------------------------
def _rows(devices: int, hours: int, now: float) -> Any:
    """Chunks of (device, boot, seq, kind, ts, received, payload), a minute apart."""
    tmpl = metrics_body_template()
    minutes = hours * 60
    chunk = []
    for m in range(minutes):
        ts = now - (minutes - m) * 60.0
        for d in range(devices):
            body = dict(tmpl, inferences=1000 + m, fallback=m % 17, degraded=m % 5)
            env = {"v": 1, "device": f"pi-{d:05d}", "boot": "b" * 16, "seq": m + 1,
                   "ts": ts, "kind": "metrics", "body": body}
            chunk.append((f"pi-{d:05d}", "b" * 16, m + 1, "metrics", ts, ts,
                          json.dumps(env, separators=(",", ":"))))
            if len(chunk) >= 5000:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _size(store: Store) -> tuple[int, int]:
    """(bytes on disk, bytes in use)."""
    if store.dialect == "postgresql":
        n = int(store.query("SELECT pg_database_size(current_database())")[0][0])
        return n, n
    page = int(store.query("PRAGMA page_size")[0][0])
    count = int(store.query("PRAGMA page_count")[0][0])
    free = int(store.query("PRAGMA freelist_count")[0][0])
    store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(store.target), (count - free) * page


def _timed(fn: Any, repeat: int = 3) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _fill_registry(store: Store, devices: int, hours: int, registry: int, now: float) -> None:
    """The device registry: every device the ingest heard of (what `fleet ls` reads)."""
    with store.transaction() as st:
        st.touch_devices([(f"pi-{d:05d}", now - d, hours * 60 if d < devices else 1, 0)
                          for d in range(registry)])
        st.update_metrics_many([(f"pi-{d:05d}", now, {"n_inferences": 1000, "n_fallback": 5,
                                                      "model_version": "1.1.0"},
                                 {"inferences": 1000}) for d in range(registry)])


def _cli(args: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall s, CPU s of the process: user + system, stdout) of one `edgefleet` run."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([str(BIN / "edgefleet"), *args], env=env, capture_output=True,
                         text=True, check=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, res.stdout


def bench_ls(store: Store, target: str, registry: int) -> dict[str, Any]:
    """`Store.devices()` and `edgefleet fleet ls` (--json, the table, --all) as processes."""
    out: dict[str, Any] = {"devices_s": _timed(store.devices)}
    env = {**os.environ, "EDGEFLEET_DB": target, "COLUMNS": "120"}
    for key, args in (("ls_cli", ["--json"]), ("ls_table", []), ("ls_all", ["--all"])):
        runs = [_cli(["fleet", "ls", *args], env) for _ in range(3)]
        best = min(runs, key=lambda r: r[0])
        out[f"{key}_s"], out[f"{key}_cpu_s"] = best[0], min(r[1] for r in runs)
        if key == "ls_cli":
            assert len(json.loads(best[2])["devices"]) == registry
        elif key == "ls_all":
            assert best[2].count("\npi-") == registry
    return out


def bench_ls_only(target: str, registry: int) -> dict[str, Any]:
    """Only `fleet ls`: a store whose registry has ``registry`` devices (no telemetry:
    `fleet ls` reads the registry alone)."""
    store = open_store(target)
    _fill_registry(store, 0, 0, registry, time.time())
    if store.dialect == "postgresql":
        store.execute("VACUUM ANALYZE")
    out = bench_ls(store, target, registry)
    store.close()
    print(f"ls {target.split('://', maxsplit=1)[0]}: {out}", flush=True)
    return out


def bench_store(target: str, tmp: Path, devices: int, hours: int, registry: int
                ) -> dict[str, Any]:
    from edgefleet.server.telemetry.report import series, write_report

    store = open_store(target)
    now = time.time()
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    n = 0
    for chunk in _rows(devices, hours, now):
        with store.transaction() as st:
            st.insert_messages(chunk)
        n += len(chunk)
    out["insert_s"] = time.perf_counter() - t0
    out["rows"] = n
    _fill_registry(store, devices, hours, registry, now)
    if store.dialect == "postgresql":
        store.execute("VACUUM ANALYZE")
    out["size"] = _size(store)
    out.update(bench_ls(store, target, registry))
    out["series_s"] = _timed(lambda: series(store))
    t0 = time.perf_counter()
    write_report(store, tmp / f"report-{store.dialect}")
    out["report_s"] = time.perf_counter() - t0
    # retention: keep the newest 3 hours raw
    t0 = time.perf_counter()
    res = prune(store, keep_raw=3 * HOUR, keep_hourly=90 * 86400.0, now=now)
    out["prune_s"] = time.perf_counter() - t0
    out["prune"] = res.as_dict()
    if store.dialect == "postgresql":
        store.execute("VACUUM ANALYZE")
    out["size_after"] = _size(store)
    out["series_after_s"] = _timed(lambda: series(store))
    t0 = time.perf_counter()
    write_report(store, tmp / f"report2-{store.dialect}")
    out["report_after_s"] = time.perf_counter() - t0
    out["left"] = int(store.query("SELECT COUNT(*) FROM messages")[0][0])
    store.close()
    print(f"store {target.split('://', maxsplit=1)[0]}: {out}", flush=True)
    return out


def _run_parts(args: argparse.Namespace) -> dict[str, Any]:
    """The parts ``--only`` asks for (all by default), each with the load around it."""
    res: dict[str, Any] = {"loads": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for part in ("registry", "guard", "store", "ls"):
            if args.only not in (None, part) or (part == "ls" and args.only is None):
                continue  # a full run measures `fleet ls` within "store"
            before = os.getloadavg()[0]
            if part == "registry":
                res["registry"] = bench_registry(tmp, args.devices, 2, 16)
            elif part == "guard":
                res["guard"] = bench_guard(tmp, args.devices)
            elif part == "store":
                res["sqlite"] = bench_store(str(tmp / "fleet.db"), tmp, args.store_devices,
                                            args.hours, args.registry_devices)
                with postgres_server() as dsn:
                    res["postgresql"] = bench_store(dsn, tmp, args.store_devices, args.hours,
                                                    args.registry_devices)
            else:
                res["ls"] = {"sqlite": bench_ls_only(str(tmp / "ls.db"), args.registry_devices)}
                with postgres_server() as dsn:
                    res["ls"]["postgresql"] = bench_ls_only(dsn, args.registry_devices)
            res["loads"][part] = (before, os.getloadavg()[0])
    return res


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A previous run's results with this run's parts in their place (each part keeps the
    load it was measured under; `ls` replaces the store's `fleet ls` rows)."""
    out = {**old, "loads": dict(old.get("loads") or {})}
    for part in ("registry", "guard", "store"):
        out["loads"].setdefault(part, old.get("load"))
    for key in ("registry", "guard", "sqlite", "postgresql"):
        if key in new:
            out[key] = new[key]
    if "ls" in new:
        for backend, ls in new["ls"].items():
            out[backend] = {**out[backend], **ls}
    out["loads"].update(new["loads"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000, help="for the registry and guard")
    ap.add_argument("--store-devices", type=int, default=500)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--registry-devices", type=int, default=10_000)
    ap.add_argument("--only", choices=("registry", "guard", "store", "ls"), default=None,
                    help="one part (ls: only `fleet ls` on a registry of --registry-devices)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only rewrite the doc from a run's saved results")
    ap.add_argument("--merge", type=Path, default=None,
                    help="with --only: put this run's part into a previous run's saved "
                         "results and rewrite the doc from them")
    args = ap.parse_args()
    if args.from_json:
        write_doc(json.loads(args.from_json.read_text()))
        return
    res = _run_parts(args)
    res["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("from_json", "merge")}
    if args.merge:
        res = _merge(json.loads(args.merge.read_text()), res)
    (Path(tempfile.gettempdir()) / "bench_fleet_size.json").write_text(json.dumps(res))
    if args.only is None or args.merge:
        write_doc(res)


def _guard_history(g: dict[str, Any]) -> str:
    if "start_s" not in g:  # a run from before the per-device index
        return ("Each device's health scanned the whole buffer for its rollbacks "
                "(devices × events).")
    return (f"The view keeps its events indexed by device (`server/rollout/event_log.py`), "
            f"so a device's health reads only its own events: a check costs devices + "
            f"their events. Before the index the same check scanned the whole buffer per "
            f"device, devices × events: 11 ms empty, 515 ms full, in an earlier run on this "
            f"machine. The rollout was started as `rollout start --devices` starts it (one "
            f"signed assignment per device, {g['start_s']:.1f} s for all).")


def _ls_history(st: dict[str, Any]) -> str:
    if "ls_all_s" not in st["sqlite"]:
        return ("`fleet ls` as a table spends its time drawing 10,000 rows with rich (the same "
                "query as `--json`): use `--json` or a filter at that size. ")
    return ("`fleet ls` draws the first 200 devices with rich and says how many more there "
            "are; `--all` past 500 rows prints plain aligned text. Drawing all 10,000 rows "
            "with rich took 10.2 s (SQLite) and 8.2 s (PostgreSQL) in an earlier run on this "
            "machine. The rest of each command's time is starting Python and importing the "
            "CLI (compare the CPU row with the wall times: the machine was shared). ")


def write_doc(res: dict[str, Any]) -> None:
    a, g, args = res["registry"], res["guard"], res["args"]
    loads = res.get("loads") or dict.fromkeys(("registry", "guard", "store"), res["load"])
    if "ls" in loads:
        loads["store"] = loads.get("store") or res.get("load")
    runs = "One run" if len({tuple(v) for v in loads.values()}) == 1 else "Runs"
    rerun = ("" if runs == "One run" else "; a part measured again: `--only guard` or "
             "`--only ls`, with `--merge` of the earlier run's saved results")
    parts = {"registry": "a", "guard": "b", "store": "c", "ls": "c's `fleet ls` rows"}
    if len({tuple(v) for v in loads.values()}) == 1:
        lb, la = next(iter(loads.values()))
        load_text = f"1-minute load average {lb:.1f} before the run, {la:.1f} after"
    else:
        load_text = "parts measured in separate runs, 1-minute load average before/after: " + (
            "; ".join(f"{parts[k]} {v[0]:.1f}/{v[1]:.1f}" for k, v in loads.items()))
    rows_a = [[ph, f"{a[k]['refreshes']:,}", f"{a[k]['requests']:,}", f"{a[k]['req_s']:,.0f}",
               f"{a[k]['refresh_s']:,.0f}", f"{a[k]['p50']:.0f}", f"{a[k]['p99']:.0f}"]
              for ph, k in (("first refresh (root, timestamp, snapshot, targets)", "first"),
                            ("steady refresh (nothing changed)", "steady"))]
    st = {k: res[k] for k in ("sqlite", "postgresql")}
    mb = 2**20
    rows_c = []
    for label, key, fmt in (
            ("raw rows inserted", "rows", lambda v: f"{v:,}"),
            ("insert (store's batched insert, 5,000 a transaction)", "insert_s",
             lambda v: f"{v:.0f} s"),
            ("store size (on disk)", "size", lambda v: f"{v[0] / mb:,.0f} MB"),
            (f"`Store.devices()` ({args['registry_devices']:,} devices)", "devices_s",
             lambda v: f"{v * 1000:.0f} ms"),
            ("`edgefleet fleet ls --json` (process, start to exit)", "ls_cli_s",
             lambda v: f"{v:.1f} s"),
            ("`edgefleet fleet ls` (table: first 200 rows, rich)", "ls_table_s",
             lambda v: f"{v:.1f} s"),
            ("`edgefleet fleet ls --all` (plain aligned text)", "ls_all_s",
             lambda v: f"{v:.1f} s"),
            ("CPU (user + system) of `fleet ls --json` / table / `--all`", "ls_cli_cpu_s",
             lambda v: f"{v:.2f} s"),
            ("report query (`series`, newest 20,000 metrics)", "series_s",
             lambda v: f"{v * 1000:.0f} ms"),
            ("`write_report` (query, 4 plots, table)", "report_s", lambda v: f"{v:.1f} s"),
            ("`fleet prune --keep-raw 3h` (batches of 5,000)", "prune_s",
             lambda v: f"{v:.0f} s"),
            ("raw rows left", "left", lambda v: f"{v:,}"),
            ("size after prune: on disk / in use", "size_after",
             lambda v: f"{v[0] / mb:,.0f} / {v[1] / mb:,.0f} MB"),
            ("report query after prune (hourly + raw)", "series_after_s",
             lambda v: f"{v * 1000:.0f} ms"),
            ("`write_report` after prune", "report_after_s", lambda v: f"{v:.1f} s")):
        if key == "ls_cli_cpu_s" and all(key in st[k] for k in st):
            rows_c.append([label] + [" / ".join(f"{st[k].get(c, float('nan')):.2f}" for c in
                                                 ("ls_cli_cpu_s", "ls_table_cpu_s",
                                                  "ls_all_cpu_s")) + " s"
                                     for k in ("sqlite", "postgresql")])
            continue
        if any(key not in st[k] for k in st) or (key == "ls_table_s" and "ls_all_s" not in
                                                   st["sqlite"]):
            continue  # a run from before this row existed
        rows_c.append([label] + [fmt(st[k][key]) for k in ("sqlite", "postgresql")])
    per_row = {k: st[k]["size"][0] / st[k]["rows"] for k in st}
    rate = {k: st[k]["rows"] / st[k]["insert_s"] for k in st}
    week = 10_000 * 7 * 1440
    sq = st["sqlite"]
    text = f"""
{runs} of `scripts/bench_fleet_size.py`; everything (clients, servers, PostgreSQL,
mosquitto) on this one 2-core machine, shared with other jobs ({load_text}). Read the
numbers as a floor for a dedicated server.

### a. The registry: TUF refreshes of {args['devices']:,} devices

`RegistryServer` (plain HTTP, default connection cap {a['cap']}) serving a real TUF
repository; {args['devices']:,} virtual devices, each a real `TufClient` (python-tuf
ngclient, its own metadata folder, what `edgefleet-agent` runs), refreshing from 2 processes
× 16 threads (32 at once). requests/s counts every GET the server answered (ngclient asks
for the next root version first, a 404, then the timestamp; snapshot and targets only
when they changed); latency is one whole refresh as a device sees it.

{md_table(["phase", "refreshes", "requests", "requests/s", "refreshes/s", "p50 ms",
           "p99 ms"], rows_a)}

What limits it here: not the connection cap (32 clients < {a['cap']}; none refused) but
the CPU. The server is one Python thread per connection (`ThreadingHTTPServer`, under the
GIL), and on this machine it shares 2 cores with the 32 client threads, whose work per
refresh is larger (ngclient loads and verifies the cached root, timestamp, snapshot and
targets, checks ed25519 signatures, writes files): the table measures the clients as much
as the server, and the server alone was not isolated. A steady fleet asks
{a['steady']['requests'] // max(1, a['steady']['refreshes'])} small requests per refresh;
10,000 devices refreshing every 60 s ask {2 * 10_000 // 60} requests/s. The metadata are
static files, so past one process a CDN or static host serves them (devices still verify
every signature: docs/operations.md, "Past one machine").

### b. The rollout guard following {args['devices']:,} devices

{args['devices']:,} devices each connect to mosquitto and publish a retained update state
(QoS 1, 100 connections at a time: {g['publish_s']:.1f} s). A fresh `FleetView` (what
`edgefleet rollout guard` opens) then has all {g['states']:,} states after
**{g['view_s'] * 1000:.0f} ms**; they take {g['view_mb']:.1f} MB of Python objects
(tracemalloc; RSS grew {g['rss_mb']:.1f} MB). One guard check of a canary over all
{args['devices']:,} devices (`RolloutController.check`, health from the states, ledger in
SQLite): **{g['check_ms']:.0f} ms**; with the view's event buffer full ({g['events']:,}
routine events the devices published, {g['events'] // max(1, g['states'])} each)
**{g['check_full_ms']:.0f} ms**. {_guard_history(g)}

### c. The fleet store: `fleet ls`, the report and retention

Scaled, not the full size: {args['store_devices']:,} devices × {args['hours']} h of
metrics at one a minute ({sq['rows']:,} rows of real ~1 KB envelopes), and
{args['registry_devices']:,} devices in the registry (what `fleet ls` reads). The full
10,000 devices × 1 week is {week:,} rows, {week / sq['rows']:.0f}× this.

{md_table(["", "SQLite", "PostgreSQL (fsync off)"], rows_c)}

{_ls_history(st)}PostgreSQL's sizes are the whole
database (`pg_database_size`, catalogs included), so its "in use" is not measured apart.

Projected to 10,000 devices × 1 week kept raw, linearly from the rows above: SQLite
{per_row['sqlite'] * week / 2**30:,.0f} GB, PostgreSQL
{per_row['postgresql'] * week / 2**30:,.0f} GB; at this insert rate loading a week would
take {week / rate['sqlite'] / 3600:.1f} h (SQLite) and
{week / rate['postgresql'] / 3600:.1f} h (PostgreSQL), and the ingest must sustain
10,000 / 60 = 167 msgs/s (docs/bench/ingest-scale.md measures 2,900 to 5,500). `fleet ls`
reads only the device registry, so its time depends on the number of devices (measured at
10,000 above), not on the telemetry kept. The report reads the newest 20,000 metrics
messages through the `(id)` order, then the newest 20,000 hourly rows: its query does not
grow with the history either. Pruning keeps the store bounded: with `--keep-raw 7d
--keep-hourly 90d` a 10,000-device fleet holds a week raw plus 24 hourly rows a device and
day ({10_000 * 24 * 90:,} rows for 90 days). Deleted rows leave free pages that new rows
reuse; the file shrinks only on VACUUM. The prune rate measured here
({sq['prune']['rolled_up'] / sq['prune_s']:,.0f} rows/s on SQLite) rolls up one day of
10,000 devices ({10_000 * 1440:,} rows) in
{10_000 * 1440 / (sq['prune']['rolled_up'] / sq['prune_s']) / 60:.0f} min; run daily.

Command: `.venv/bin/python scripts/bench_fleet_size.py`{rerun}
"""
    path = write_section("fleet-size", "The server at fleet size: registry, rollout guard, "
                         "store", text)
    print(path.read_text())


if __name__ == "__main__":
    main()
