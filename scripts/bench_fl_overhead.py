"""Wall time per round: our ServerApp/ClientApp (DP on) vs a bare Flower app, same nodes.

One real ``flower-superlink`` and N real ``flower-supernode`` processes (TLS and node
authentication, as ``edgefleet train`` runs them) serve two runs in turn: first the
bare Message-API app in ``scripts/bare_flower_app`` (FedAvg, a trivial NumPy update of
the same array shapes), then ours with sample-level DP. Both runs time a round on the
ServerApp side, between consecutive ``evaluate_fn`` calls (train + federated
evaluation of every node). Writes docs/bench/fl_overhead.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.server.fl_runner import (
    BIN,
    CONN,
    EmbeddedFederation,
    flower_env,
    flower_status,
    follow_run,
    submit_run,
)
from edgefleet.server.fl_settings import run_settings
from edgefleet.server.fl_store import FlStore

NODES, ROUNDS = 5, 3
BARE_APP = Path(__file__).resolve().parent / "bare_flower_app"


def bare_round_seconds(fed: EmbeddedFederation, work: Path) -> list[float]:
    """Run the bare app to completion; seconds per round from its ServerApp's stamps."""
    times = work / "bare-times.json"
    cfg = work / "bare.toml"
    cfg.write_text(f'num-rounds = {ROUNDS}\nnum-nodes = {NODES}\ntimes-file = "{times}"\n')
    res = fed.conn.flwr("run", str(BARE_APP), CONN, "--format", "json", "--run-config", str(cfg))
    run_id = str(json.loads(res.stdout[res.stdout.index("{"):])["run-id"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if flower_status(fed.conn, run_id).startswith("finished:"):
            break
        time.sleep(1)
    stamps = json.loads(times.read_text())
    if len(stamps) != ROUNDS + 1:
        raise SystemExit(f"bare run ended after {len(stamps) - 1} of {ROUNDS} rounds; "
                         f"status {flower_status(fed.conn, run_id)}")
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def ours_round_seconds(fed: EmbeddedFederation, work: Path) -> list[float]:
    """Our ServerApp with sample-level DP at ε=3; ``seconds`` per round from ``fl.db``."""
    s = run_settings({"tag": "overhead", "num-rounds": ROUNDS, "dp": "sample", "epsilon": 3.0,
                      "min-nodes": NODES, "num-nodes": NODES, "seed": 0,
                      "db": str(work / "fl.db"), "out": ""})
    store = FlStore(work / "fl.db")
    follow_run(store, "overhead", fed.conn, submit_run(fed.conn, s, work), timeout=300)
    return [r.seconds for r in store.rounds("overhead")[1:] if r.seconds is not None]


def cold_import_seconds(module: str, work: Path) -> float:
    """Median wall time of a fresh interpreter importing ``module`` (a ClientApp's start-up)."""
    out = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([str(BIN / "python"), "-c", f"import {module}"], check=True,
                       env={**flower_env(work / "imp"), "PYTHONPATH": str(BARE_APP)})
        out.append(time.perf_counter() - t)
    return statistics.median(out)


COLD_WORK = """
import json, time
t0 = time.perf_counter()
import edgefleet.device.fl_client as fc
t1 = time.perf_counter()
from edgefleet.device.dp import DpEvent, epsilon_for, noise_for_epsilon
d = fc.load_local_data(fc.node_settings({"partition-id": 0, "num-partitions": %d}))
t2 = time.perf_counter()
q = min(1.0, 32 / len(d.y_train))
sigma = noise_for_epsilon(3.0, 1e-5, q, %d * 20)
t3 = time.perf_counter()
epsilon_for([DpEvent(q, sigma, 20)], 1e-5)
t4 = time.perf_counter()
print(json.dumps({"import the ClientApp": t1 - t0, "load the local share (demo partition)": t2 - t1,
                  "calibrate σ for the run (each message is a fresh process)": t3 - t2,
                  "account the round (RDP)": t4 - t3}))
"""


def clientapp_cold_costs(work: Path) -> dict[str, float]:
    """What one training message costs our ClientApp before it trains, in a fresh process."""
    res = subprocess.run([str(BIN / "python"), "-c", COLD_WORK % (NODES, ROUNDS)], check=True,
                         capture_output=True, text=True, env=flower_env(work / "cold"))
    costs: dict[str, float] = json.loads(res.stdout.strip().splitlines()[-1])
    return costs


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="fl-overhead-"))
    t0 = time.monotonic()
    with EmbeddedFederation(work / "fed", devices=NODES, secure=True) as fed:
        time.sleep(5)  # let every SuperNode register its first poll
        load = [os.getloadavg()[0]]
        bare = bare_round_seconds(fed, work)
        load.append(os.getloadavg()[0])
        print("bare", bare, flush=True)
        ours = ours_round_seconds(fed, work)
        load.append(os.getloadavg()[0])
        print("ours", ours, load, flush=True)
    cold = clientapp_cold_costs(work)
    imports = {m: cold_import_seconds(m, work) for m in
               ("flwr.clientapp", "bare_app", "edgefleet.device.fl_client")}
    print("imports", imports, f"total {time.monotonic() - t0:.0f} s", flush=True)
    mb, mo = statistics.mean(bare), statistics.mean(ours)
    extra_eval = cold["import the ClientApp"] + cold["load the local share (demo partition)"]
    extra = NODES * (sum(cold.values()) + extra_eval) / 2
    rows = [[f"round {i + 1}", f"{b:.1f}", f"{o:.1f}", f"{o / b:.2f}x"]
            for i, (b, o) in enumerate(zip(bare, ours, strict=True))]
    rows.append(["**mean**", f"**{mb:.1f}**", f"**{mo:.1f}**", f"**{mo / mb:.2f}x**"])
    body = f"""
One real `flower-superlink` and {NODES} real `flower-supernode` processes (TLS, node
authentication) serve two runs of {ROUNDS} rounds in turn: a bare Flower Message-API app
(`scripts/bare_flower_app`: FedAvg, each ClientApp adds a constant to arrays of the
digits MLP's shapes, 19240 bytes each way) and ours (`edgefleet` ServerApp and ClientApp,
sample-level DP at ε=3: 20 DP-SGD steps, ledger write, accounting, server-side
evaluation, SQLite). A round is timed on the ServerApp side, between consecutive
`evaluate_fn` calls: train and federated evaluation on every node.
Run: `python scripts/bench_fl_overhead.py`.

{md_table(["", "bare Flower, s", "edgefleet (DP on), s", "ratio"], rows)}

Our overhead: **{mo / mb:.2f}x** a bare Flower round (target ≤ 1.2x). The machine is
shared: its 1-minute load average was {load[0]:.1f} before the bare run, {load[1]:.1f}
between the runs and {load[2]:.1f} after ours (2 cores), so the ratio carries that noise.

Where a round's time goes: each message starts a fresh `flwr-clientapp` process, and
the SuperNode and the ServerApp's grid poll for work. Cold start of a Python process
importing a ClientApp, median of 3 (ours defers dp-accounting and the model code to its
first message):

{md_table(["module imported", "seconds"], [[f"`{m}`", f"{s:.2f}"] for m, s in imports.items()])}

What one training message costs our ClientApp before its DP-SGD steps, in a fresh
process (Flower starts one per message, so nothing is cached between rounds):

{md_table(["step", "seconds"], [[k, f"{v:.2f}"] for k, v in cold.items()])}

With {NODES} nodes, a round starts {2 * NODES} ClientApp processes (train and evaluate) on 2
cores; the bare app's rounds are that process churn plus Flower's polling, which
dominate both apps. Our extra start-up work per round is about {NODES} × (train:
{sum(cold.values()):.1f} s + evaluate: {extra_eval:.1f} s) / 2 cores = {extra:.1f} s of the
{mo - mb:.1f} s difference; the rest is the DP-SGD steps, the ledger's fsyncs, the
server-side evaluation and the machine's noise. What would close the gap: keep σ per
(ε, δ, q, steps) in the device's state folder instead of calibrating it in every fresh
process, and cache the demo partition (a deployed device reads one `.npz` instead).
"""
    print(write_section("fl_overhead", "Federated round overhead vs bare Flower", body))


if __name__ == "__main__":
    main()
