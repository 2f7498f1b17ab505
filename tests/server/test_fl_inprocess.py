"""The ServerApp strategy and the ClientApp in one process: declines, bad models, ε."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.wire.federated import DECLINED_BUDGET, REJECTED_INPUT
from edgefleet.models.sim.fl_app import app as client_app
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.server_app import FleetStrategy
from edgefleet.server.fl.settings import build_strategy, run_settings

pytestmark = pytest.mark.slow


def _grid(tmp_path: Path, n: int, budget: dict[int, float]) -> InProcessGrid:
    return InProcessGrid(client_app, n, lambda i: {
        "partition-id": i, "num-partitions": n, "state-dir": str(tmp_path / f"n{i}"),
        "privacy-budget": budget.get(i, 50.0)})


def test_declined_device_is_counted_and_the_round_goes_on(tmp_path: Path) -> None:
    logging.disable(logging.INFO)
    s = run_settings({"num-rounds": 2, "dp": "sample", "epsilon": 3.0, "min-nodes": 3,
                      "num-nodes": 3, "seed": 0, "local-steps": 5, "db": str(tmp_path / "x.db")})
    st = FleetStrategy(build_strategy(s), s)
    _, _, model = s.initial_model()
    res = st.start(grid=_grid(tmp_path, 3, {2: 0.5}), initial_arrays=ArrayRecord(model.params),
                   num_rounds=2)
    assert len(res.arrays) == 4
    assert st.stats[1]["nodes"] == 2 and st.stats[1]["declined"] == 1
    assert st.stats[1]["declines"] == {"budget": 1}
    assert st.stats[2]["declined"] == 1
    assert 2.9 < (st.epsilon() or 0) <= 3.0


@pytest.mark.parametrize("arrays", [
    [np.full((64, 64), np.nan, np.float32), np.zeros(64, np.float32)],
    [np.zeros((64, 64), np.float32)],
    [np.zeros((64, 8), np.float32), np.zeros(9, np.float32)],
    [np.zeros((64, 10), np.int32), np.zeros(10, np.int32)],
])
def test_bad_global_model_is_rejected_with_a_reason(tmp_path: Path,
                                                    arrays: list[np.ndarray]) -> None:
    s = run_settings({"dp": "off"})
    grid = _grid(tmp_path, 1, {})
    msg = Message(content=RecordDict({"arrays": ArrayRecord(arrays),
                                      "config": ConfigRecord(s.train_config())}),
                  dst_node_id=1000, message_type="train")
    before = default_metrics().counter("fl.rejected_input")
    reply = next(iter(grid.send_and_receive([msg])))
    assert reply.has_error()
    assert reply.error.code == REJECTED_INPUT != DECLINED_BUDGET
    assert (reply.error.reason or "").startswith("rejected:")
    assert default_metrics().counter("fl.rejected_input") == before + 1
