"""Robust aggregation on real processes: a SuperLink and 5 SuperNodes, one of them poisoning.

The same federation runs FedAvg and then trimmed mean; device 4 scales its update by
50 (the ``attack`` node-config of ``tests/support/fl_attack.py``, a test-only ClientApp
that is not installed with edgefleet: the SuperNodes import it from this checkout).
The clean reference is the same run with no attacker through the in-process grid
(same ClientApp, seeds and shares).
Also: per-device accuracy lands in the FL store, and ``edgefleet train --json``
reports it with ``--strategy median --norm-bound``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore
from tests.conftest import run_cli
from tests.support.fl_attack import APP_REF as ATTACK_APP
from tests.support.robust import ATTACKER, DEVICES, run_inprocess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
ROUNDS = 2  # each message starts a flwr-clientapp process: rounds are costly
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(400)
def test_trimmed_mean_survives_a_scaling_device_fedavg_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    clean = run_inprocess("fedavg", rounds=ROUNDS).accuracy
    store = FlStore(tmp_path / "fl.db")
    final: dict[str, float] = {}

    def node(i: int) -> dict[str, object]:
        cfg: dict[str, object] = {"alpha": 100.0, "privacy-min-mode": "off",
                                  "insecure-reproducible-noise-seed": 0}
        if i == ATTACKER:
            cfg.update({"attack": "scale", "attack-factor": 50.0})
        return cfg

    with EmbeddedFederation(tmp_path / "fed", devices=DEVICES, secure=False,
                            node_config=node) as fed:
        for strategy in ("fedavg", "trimmed"):
            s = run_settings({"tag": strategy, "num-rounds": ROUNDS, "dp": "off", "seed": 0,
                              "strategy": strategy, "min-nodes": DEVICES,
                              "num-nodes": DEVICES, "db": str(tmp_path / "fl.db")})
            run_id = submit_run(fed.conn, s, tmp_path, ATTACK_APP)
            run = follow_run(store, strategy, fed.conn, run_id, timeout=300)
            assert run.final is not None
            final[strategy] = run.final["accuracy"]
            spread = run.final["device_accuracy"]
            assert spread["devices"] == DEVICES
            assert spread["min"] <= spread["median"] <= spread["max"]
            assert spread["per_node"][str(spread["worst"])] == spread["min"]
            evals = store.device_evals(strategy)
            assert sorted(evals) == list(range(1, ROUNDS + 1))
            assert evals[ROUNDS] == spread["per_node"]
        assert "TEST/BENCHMARK ATTACK" in fed.log_tail(f"node-{ATTACKER}", 400)
    assert final["fedavg"] < clean - 0.02, (final, clean)
    assert final["trimmed"] >= clean - 0.02, (final, clean)


@pytest.mark.timeout(300)
def test_train_cli_reports_accuracy_per_device(tmp_path: Path) -> None:
    res = run_cli("train", "--rounds", "2", "--devices", "3", "--dp", "off", "--strategy",
                  "median", "--norm-bound", "3", "--insecure", "--format", "onnx", "--seed", "1",
                  "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "pkg"), "--json",
                  timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    spread = out["device_accuracy"]
    assert spread["devices"] == 3 and len(spread["per_node"]) == 3
    assert 0.0 <= spread["min"] <= spread["median"] <= spread["max"] <= 1.0
    assert str(spread["worst"]) in spread["per_node"]
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["lineage"]["strategy"] == "median"
    assert manifest["lineage"]["robust"]["norm_bound"] == 3.0
