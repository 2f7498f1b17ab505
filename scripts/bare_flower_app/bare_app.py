"""A minimal Flower Message-API app: the baseline for our ServerApp/ClientApp overhead.

FedAvg over arrays of the same shapes as the digits MLP; each ClientApp adds a constant
(a trivial NumPy "update") and evaluates nothing. The ServerApp appends a timestamp per
round (its ``evaluate_fn`` runs once at round 0 and after every round, like ours) to
the JSON file named by the run config's ``times-file``. Benchmark-only: not packaged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

SHAPES = [(64, 64), (64,), (64, 10), (10,)]  # the digits MLP 64-64-10

clientapp = ClientApp()


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    """Add 0.01 to every weight: the cheapest update that still moves all the bytes."""
    arrays = [a + np.float32(0.01) for a in msg.content["arrays"].to_numpy_ndarrays()]
    return Message(RecordDict({"arrays": ArrayRecord(arrays),
                               "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@clientapp.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report a constant: federated evaluation with no work."""
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "eval-loss": 0.0})}),
                   reply_to=msg)


serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg on all nodes for ``num-rounds`` rounds, timestamps to ``times-file``."""
    n = int(context.run_config["num-nodes"])
    out = Path(str(context.run_config["times-file"]))
    stamps: list[float] = []

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.time())
        out.write_text(json.dumps(stamps))
        return MetricRecord({})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n,
                      min_evaluate_nodes=n, min_available_nodes=n)
    initial = ArrayRecord([np.zeros(s, dtype=np.float32) for s in SHAPES])
    strategy.start(grid=grid, initial_arrays=initial,
                   num_rounds=int(context.run_config["num-rounds"]), evaluate_fn=stamp)
