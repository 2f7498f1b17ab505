"""One federated run in-process (real ServerApp strategy + ClientApp), 1 of 5 devices attacking.

Shared by the robust-aggregation tests and ``scripts/bench_robust.py``, so both measure
the same thing: IID-like shares (Dirichlet α = 100), no DP, fixed seeds.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from edgefleet.device.runtime.mlp import MLP
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.server_app import FleetStrategy
from edgefleet.server.fl.settings import build_strategy, run_settings
from tests.support.fl_attack import app as client_app

DEVICES = 5
ATTACKER = DEVICES - 1


@dataclass(frozen=True)
class RobustRun:
    """Final server-side test accuracy and the strategy (for its per-round facts)."""

    accuracy: float
    strategy: FleetStrategy


def run_inprocess(strategy: str = "fedavg", attack: str = "", factor: float = 10.0,
                  norm_bound: float = 0.0, rounds: int = 15, alpha: float = 100.0,
                  seed: int = 0, extra: dict[str, Any] | None = None) -> RobustRun:
    """Run ``rounds`` of ``strategy``; device ``ATTACKER`` sends ``attack`` updates."""
    logging.disable(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory(prefix="robust-") as work:
            s = run_settings({"num-rounds": rounds, "dp": "off", "min-nodes": DEVICES,
                              "num-nodes": DEVICES, "seed": seed, "strategy": strategy,
                              "norm-bound": norm_bound, "db": f"{work}/fl.db", **(extra or {})})

            def node(i: int) -> dict[str, Any]:
                # The operator's own simulated devices: a policy admitting the non-private
                # runs under test, and reproducible sampling (a test-only node flag).
                cfg: dict[str, Any] = {"partition-id": i, "num-partitions": DEVICES,
                                       "alpha": alpha, "state-dir": f"{work}/n{i}",
                                       "privacy-min-mode": "off",
                                       "insecure-reproducible-noise-seed": max(seed, 0)}
                if attack and i == ATTACKER:
                    cfg.update({"attack": attack, "attack-factor": factor})
                return cfg

            st = FleetStrategy(build_strategy(s), s)
            task, norm, model = s.initial_model()
            res = st.start(grid=InProcessGrid(client_app, DEVICES, node),
                           initial_arrays=ArrayRecord(model.params), num_rounds=rounds)
            split = task.split()
            final = MLP.from_params(res.arrays.to_numpy_ndarrays())
            return RobustRun(final.accuracy(s.normalized(split.x_test, norm), split.y_test), st)
    finally:
        logging.disable(logging.NOTSET)
