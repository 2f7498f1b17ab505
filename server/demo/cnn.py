"""``edgefleet demo --model cnn``: bring your own model, then fine-tune its head with DP.

A small, in-process companion to the fleet demo (:mod:`.fleet`): it trains the worked
example's Keras CNN (:mod:`edgefleet.models.build.example_cnn`) as a user would, imports
it with ``models import``, gives N simulated devices a shifted camera each
(:mod:`edgefleet.models.sim.head_fleet`: turned, dimmed, noisy, thicker or thinner
strokes; 800 images each), runs one federated DP head fine-tuning through
the real ServerApp and ClientApp in the in-process grid, and reports each device's
accuracy on its own held-out shifted images before and after. Then (unless
``--no-fleet``) both versions go onto a real fleet (:mod:`.cnn_fleet`): agents fed by
sensor simulators with the same cameras serve the imported version, then the fine-tuned
one (canary on one agent, promote), and the report says what each agent served and how
accurately. It does not slow the default demo (a separate path).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from edgefleet.device.privacy.ledger import LEDGER_FILE, PrivacyLedger
from edgefleet.server.fl.inprocess import InProcessGrid

__all__ = ["run_cnn_demo", "run_head_fl"]

Say = Callable[[str], None]
DELTA = 1e-5
#: Images each device photographs (docs/bench/byom-fl-fleet.md: DP needs records).
RECORDS = 800


def run_head_fl(fleet: dict[str, Any], run_config: dict[str, Any], *, state: str = "fl",
                noise_seed: int | None = None, **policy: Any) -> None:
    """One federated head run through the real ServerApp and ClientApp (in-process grid)."""
    from edgefleet.models.sim.head_fleet import client_app, node_config
    from edgefleet.server.fl import server_app
    from edgefleet.server.fl.settings import run_settings

    n = len(fleet["devices"])
    s = run_settings({"package": str(fleet["server_pkg"]), "min-nodes": n, "num-nodes": n,
                      **run_config})
    grid = InProcessGrid(client_app, n, lambda i: node_config(
        fleet, i, state=state, noise_seed=noise_seed, **policy))
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=s.flower_config()))


def run_cnn_demo(workdir: Path, devices: int, rounds: int, epsilon: float, say: Say, *,
                 on_fleet: bool = True, rate: float = 20.0, stream_s: float = 20.0
                 ) -> dict[str, Any]:
    """Train, import, fine-tune with DP on ``devices`` shifted devices; with ``on_fleet``,
    serve both versions on real agents (:mod:`.cnn_fleet`); the report."""
    from edgefleet.models.build.example_cnn import train_digits_cnn
    from edgefleet.models.build.importer import ImportOptions, import_model
    from edgefleet.models.sim.head_fleet import FIELD_SHIFTS, make_data, make_fleet
    from edgefleet.models.sim.shift import package_accuracy
    from edgefleet.server.demo.fleet import fresh_workdir
    from edgefleet.server.fl.store import FlStore

    work = fresh_workdir(workdir)
    times: dict[str, float] = {}
    t = time.monotonic()

    def done(step: str) -> None:
        nonlocal t
        times[step] = round(time.monotonic() - t, 1)
        t = time.monotonic()

    say("training the Keras CNN (the user's model)")
    (work / "data").mkdir()
    data = make_data(work / "data")
    model = train_digits_cnn(data["x_train"], data["y_train"], work / "data" / "cnn.keras")
    done("train")
    say("models import")
    pkg = work / "models" / "cnn"
    import_model(ImportOptions(model=model, out=pkg, calibration=data["calib"],
                               eval=data["eval"], labels=data["labels"], scale=1 / 16))
    done("import")
    say(f"{devices} devices with shifted cameras, {RECORDS} images each")
    shifts = [FIELD_SHIFTS[i % len(FIELD_SHIFTS)] for i in range(devices)]
    fleet = make_fleet(data, pkg, work / "fleet", shifts, records=RECORDS)
    done("devices")
    say(f"federated DP head fine-tuning (ε = {epsilon:g}, {rounds} rounds)")
    out = work / "models" / "cnn-ft"
    budget = max(10.0, 2 * epsilon)
    run_head_fl(fleet, {"tag": "cnn-head", "num-rounds": rounds, "dp": "sample",
                        "epsilon": epsilon, "local-steps": 30, "batch-size": 64, "lr": 0.5,
                        "clip": 1.0, "delta": DELTA, "db": str(work / "fl.db"), "out": str(out)},
                budget=budget, max_run_epsilon=epsilon)
    done("fine-tune")
    run = FlStore(work / "fl.db").run("cnn-head")
    if run is None or run.status != "finished":
        raise RuntimeError(f"the head fine-tuning run did not finish: {run}")
    per_device = []
    for i, d in enumerate(fleet["devices"]):
        ledger = PrivacyLedger(d["root"] / "fl" / LEDGER_FILE, budget, DELTA)
        per_device.append({
            "device": f"dev{i}", "shift": d["shift"].describe(), "train": len(d["y"]),
            "held_out": len(d["y_test"]), "epsilon": ledger.run_spent("1", DELTA),
            "accuracy_before": package_accuracy(pkg, d["x_test"], d["y_test"]),
            "accuracy_after": package_accuracy(out, d["x_test"], d["y_test"])})
    served = None
    if on_fleet:
        from edgefleet.server.demo.cnn_fleet import MAX_AGENTS, serve_on_fleet

        served = serve_on_fleet(work / "fleet-run", pkg, out, shifts[:MAX_AGENTS],
                                rate=rate, stream_s=stream_s, say=say)
        times.update(served["timings_s"])
    return {
        "model": "cnn", "workdir": str(work), "devices": devices, "rounds": rounds,
        "fleet": served,
        "epsilon_target": epsilon,
        "epsilon_spent": max(d["epsilon"] for d in per_device),
        "accuracy_unshifted": package_accuracy(pkg, data["x_eval"].reshape(
            len(data["y_eval"]), -1), data["y_eval"]),
        "per_device": per_device,
        "accuracy_before": _pooled(per_device, "accuracy_before"),
        "accuracy_after": _pooled(per_device, "accuracy_after"),
        "packages": {"imported": str(pkg), "fine_tuned": str(out)},
        "timings_s": times}


def _pooled(rows: list[dict[str, Any]], key: str) -> float:
    n = sum(r["held_out"] for r in rows)
    return float(sum(r[key] * r["held_out"] for r in rows) / n)
