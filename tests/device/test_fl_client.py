"""The production ClientApp trains only on samples the device stored, and has no attack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.fl import client as fl_client
from edgefleet.device.runtime.mlp import MLP
from edgefleet.device.wire.federated import ARRAYS, CONFIG, REJECTED_INPUT
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.settings import run_settings


def _train_msg() -> Message:
    s = run_settings({"dp": "off", "local-steps": 2})
    model = MLP.init((64, 16, 10), seed=0)
    return Message(content=RecordDict({ARRAYS: ArrayRecord(model.params),
                                       CONFIG: ConfigRecord(s.train_config())}),
                   dst_node_id=1000, message_type="train")


def test_without_stored_samples_the_device_declines_instead_of_using_public_data(
        tmp_path: Path) -> None:
    grid = InProcessGrid(fl_client.app, 1, lambda i: {"state-dir": str(tmp_path)})
    reply = next(iter(grid.send_and_receive([_train_msg()])))
    assert reply.has_error()
    assert reply.error.code == REJECTED_INPUT
    assert "no local samples" in (reply.error.reason or "")


def test_with_stored_samples_the_device_trains_on_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    np.savez(tmp_path / "samples.npz", x=x, y=y)
    grid = InProcessGrid(fl_client.app, 1, lambda i: {
        "state-dir": str(tmp_path), "data": str(tmp_path / "samples.npz")})
    reply = next(iter(grid.send_and_receive([_train_msg()])))
    assert not reply.has_error(), reply.error.reason
    assert reply.content.metric_records["metrics"]["num-examples"] == 32  # 80 % of 40


@pytest.mark.parametrize("key", ["attack", "attack-factor"])
def test_no_node_config_switches_on_an_attack(key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("-", "_")):
        fl_client.node_settings({key: "scale" if key == "attack" else 10})
