"""Federated head fine-tuning of an imported Keras CNN, through the real ServerApp/ClientApp.

Three devices hold shifted digits (a dimmer, noisy camera) in their sample stores and the
package as a device receives it (packed and unpacked: no ``source/`` data). The run
trains the head with sample-level DP in the in-process grid; each device's ledger
records the spend; the server writes the head back, re-quantizes and packages a new
version, which loads on a device and predicts at least as well on the devices' data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.data.embeddings import cache_folder
from edgefleet.device.fl import client as fl_client
from edgefleet.device.privacy.ledger import LEDGER_FILE, PrivacyLedger
from edgefleet.device.runtime.archive import extract_package, pack_package
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.sim.head_fleet import make_fleet, node_config
from edgefleet.models.sim.shift import Shift
from edgefleet.server.demo.cnn import run_head_fl
from edgefleet.server.fl.inprocess import InProcessGrid
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore

pytestmark = pytest.mark.slow
DEVICES = 3
SHIFT = Shift(intensity=0.6, noise=2.0)


def _accuracy(pkg: Path, x: np.ndarray, y: np.ndarray) -> float:
    p = Predictor.load(pkg, backend="onnx", threads=1)
    preds = p.predict_batch(x.reshape(len(x), *p.manifest.input.shape))
    return float(np.mean([q.label for q in preds] == y))


@pytest.fixture(scope="module")
def fleet(data: dict[str, Any], keras_pkg: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> dict[str, Any]:
    return make_fleet(data, keras_pkg, tmp_path_factory.mktemp("head-fleet"),
                      [SHIFT] * DEVICES)


def _node(fleet: dict[str, Any], i: int) -> dict[str, Any]:
    return node_config(fleet, i, noise_seed=0)


def test_devices_fine_tune_the_head_with_dp_and_the_new_version_predicts(
        fleet: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cnn-ft"
    run_head_fl(fleet, {"tag": "head", "num-rounds": 4, "dp": "sample", "epsilon": 3.0,
                        "delta": 1e-5, "local-steps": 30, "batch-size": 64, "lr": 0.05,
                        "clip": 5.0, "strategy": "fedavg", "db": str(tmp_path / "fl.db"),
                        "out": str(out)}, noise_seed=0)
    run = FlStore(tmp_path / "fl.db").run("head")
    assert run is not None and run.status == "finished", run
    assert run.final is not None and run.final["package"] == str(out)
    # every device trained every round and accounted its spend in its own ledger
    rounds = FlStore(tmp_path / "fl.db").rounds("head")
    assert [r.nodes for r in rounds if r.round] == [DEVICES] * 4
    for d in fleet["devices"]:
        ledger = PrivacyLedger(d["root"] / "fl" / LEDGER_FILE, 10.0, 1e-5)
        spent = ledger.run_spent("1", 1e-5)
        # ε = 3 of training plus the small cost of the noised evaluations (σ = 20)
        assert 2.9 < spent <= 3.1, spent
        # the backbone's embeddings were cached next to the store
        assert list(cache_folder(d["store"]).glob("*.npz"))
    # the new version: a signed-able package with all three variants (the TFLite one
    # rebuilt from the kept Keras model), a new head, lineage
    m = load_package(out)
    assert m.name == "cnn" and m.version == "1.0.1"
    assert set(m.variants) == {"onnx-fp32", "onnx-int8", "tflite-int8"}
    assert m.lineage["fine_tuned"]["tflite"]["rebuilt"] is True
    assert m.head is not None and m.head.trainable
    ft = m.lineage["fine_tuned"]
    assert ft["dp"]["mode"] == "sample" and 2.9 < ft["dp"]["epsilon"] <= 3.1
    assert ft["parent"]["version"] == "1.0.0"
    # on a device: it loads, verifies and predicts; on the devices' (shifted) data it is
    # not worse than the imported model beyond noise
    dev = tmp_path / "device"
    extract_package(pack_package(out, tmp_path / "ft.tar"), dev)
    x = np.concatenate([d["x"] for d in fleet["devices"]])
    y = np.concatenate([d["y"] for d in fleet["devices"]])
    before = _accuracy(fleet["devices"][0]["pkg"], x, y)
    after = _accuracy(dev, x, y)
    Predictor.load(dev, backend="tflite", threads=1)  # its golden inputs pass on LiteRT
    print(f"shifted-data accuracy: imported {before:.3f}, DP head fine-tuned {after:.3f}")
    assert after >= before - 0.02, (before, after)


def test_a_device_whose_backbone_differs_rejects_the_round(
        fleet: dict[str, Any], tmp_path: Path, data: dict[str, Any]) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from edgefleet.device.core.metrics import default_metrics
    from edgefleet.device.wire.federated import HEAD_BACKBONE, REJECTED_INPUT

    s = run_settings({"package": str(fleet["server_pkg"]), "db": str(tmp_path / "x.db")})
    cfg = {**s.train_config(), HEAD_BACKBONE: "0" * 64}
    grid = InProcessGrid(fl_client.app, 1, lambda i: _node(fleet, i))
    head = load_package(fleet["server_pkg"]).head
    assert head is not None and head.params is not None
    from edgefleet.device.runtime.mlp import load_params

    msg = Message(content=RecordDict({
        "arrays": ArrayRecord(load_params(fleet["server_pkg"] / head.params)),
        "config": ConfigRecord(cfg)}), dst_node_id=1000, message_type="train")
    before = default_metrics().counter("fl.rejected_input")
    reply = next(iter(grid.send_and_receive([msg])))
    assert reply.has_error() and reply.error.code == REJECTED_INPUT
    assert "backbone 000000000000" in (reply.error.reason or "")
    assert default_metrics().counter("fl.rejected_input") == before + 1
