"""Simulated devices for federated head fine-tuning of an imported package.

Shared by tests/models/test_head_fl.py and scripts/bench_byom_fl.py so both run the
same fleet: each device holds the package as a device receives it (packed and unpacked:
no ``source/`` data), a sample store of its share of the training images as its shifted
camera delivers them (:mod:`edgefleet.models.sim.shift`), and, for the benchmark, its
own held-out shifted images that neither the CNN nor the head ever trains on.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict

from edgefleet.device.data.store import SampleStore
from edgefleet.device.runtime.archive import extract_package, pack_package
from edgefleet.models.sim.shift import Shift, shifted_pixels


def make_fleet(data: dict[str, Any], package: Path, root: Path, shifts: Sequence[Shift],
               seed: int = 7) -> dict[str, Any]:
    """One device per shift: its share of ``x_train`` (shifted) in its store, and its share
    of ``x_eval`` (shifted the same way) as ``x_test``/``y_test`` for measuring."""
    server_pkg = root / "server" / package.name
    shutil.copytree(package, server_pkg)
    archive = pack_package(package, root / f"{package.name}.tar")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data["y_train"]))
    shares = np.array_split(order, len(shifts))
    tests = np.array_split(rng.permutation(len(data["y_eval"])), len(shifts))
    devices = []
    for i, (shift, idx, tidx) in enumerate(zip(shifts, shares, tests, strict=True)):
        d = root / f"dev{i}"
        pkg = d / "model"
        extract_package(archive, pkg)
        n = len(idx)
        x = shifted_pixels(data["x_train"][idx], shift, rng).reshape(n, -1)
        y = data["y_train"][idx]
        with SampleStore(d / "data" / "samples.db") as st:
            st.add_many([(x[j], int(y[j])) for j in range(n)], "import", "cnn@1.0.0")
        x_test = shifted_pixels(data["x_eval"][tidx], shift, rng).reshape(len(tidx), -1)
        devices.append({"root": d, "pkg": pkg, "store": d / "data" / "samples.db",
                        "shift": shift, "x": x, "y": y, "x_test": x_test,
                        "y_test": data["y_eval"][tidx]})
    return {"root": root, "server_pkg": server_pkg, "devices": devices}


def node_config(fleet: dict[str, Any], i: int, *, state: str = "fl", noise_seed: int = 0,
                **policy: Any) -> dict[str, Any]:
    """Device ``i``'s SuperNode node config; ``policy`` sets ``privacy-*`` keys
    (``min_mode="off"`` lets a run without DP through)."""
    d = fleet["devices"][i]
    cfg: dict[str, Any] = {
        "sample-store": str(d["store"]), "model-package": str(d["pkg"]),
        "state-dir": str(d["root"] / state), "privacy-budget": 10.0, "partition-id": i,
        "privacy-evaluation": "noised", "insecure-reproducible-noise-seed": noise_seed}
    cfg.update({f"privacy-{k.replace('_', '-')}": v for k, v in policy.items()})
    return cfg


def run_head_fl(fleet: dict[str, Any], run_config: dict[str, Any], *, state: str = "fl",
                noise_seed: int = 0, **policy: Any) -> None:
    """One federated head run through the real ServerApp and ClientApp (in-process grid)."""
    from edgefleet.device.fl import client as fl_client
    from edgefleet.server.fl import server_app
    from edgefleet.server.fl.inprocess import InProcessGrid
    from edgefleet.server.fl.settings import run_settings

    n = len(fleet["devices"])
    s = run_settings({"package": str(fleet["server_pkg"]), "min-nodes": n, "num-nodes": n,
                      **run_config})
    grid = InProcessGrid(fl_client.app, n, lambda i: node_config(
        fleet, i, state=state, noise_seed=noise_seed, **policy))
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=s.flower_config()))
