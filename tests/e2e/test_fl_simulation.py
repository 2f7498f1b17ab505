"""``edgefleet train --simulate``: the real ServerApp and ClientApp on Flower's simulation
runtime (a real local Ray), each virtual device with its own ledger and policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.privacy.accounting import DpEvent
from edgefleet.device.privacy.ledger import LEDGER_FILE, PrivacyLedger
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.mlp import PARAMS_FILE, load_params
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.simulation import node_dir
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DEVICES, ROUNDS, SPENT = 10, 2, 3


def _ledger(work: Path, device: int) -> PrivacyLedger:
    return PrivacyLedger(Path(node_dir(str(work / "simulation"), device)) / LEDGER_FILE, 10.0)


@pytest.mark.timeout(240)
def test_simulated_fleet_trains_accounts_and_counts_a_spent_device(tmp_path: Path) -> None:
    work = tmp_path / "w"
    # Device 3 spent most of its lifetime budget in earlier runs: ε≈9.94 of 10.
    spent = _ledger(work, SPENT)
    spent.record("earlier-run", 1, DpEvent(q=1.0, sigma=0.87, steps=3), run_limit=1000.0)
    before = spent.spent()
    assert 9.9 < before < 10

    res = run_cli("train", "--simulate", str(DEVICES), "--rounds", str(ROUNDS), "--ray-cpus",
                  "2", "--epsilon", "3", "--pretrain-epochs", "5", "--seed", "1", "--format",
                  "onnx", "--work-dir", str(work), "--out", str(tmp_path / "pkg"), "--json",
                  timeout=220)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)

    assert [r["round"] for r in out["rounds"]] == [1, 2]
    for r in out["rounds"]:  # every device sampled: 9 trained, the spent one declined
        assert (r["nodes"], r["declined"], r["failed"]) == (DEVICES - 1, 1, 0)
        assert r["declines"] == {"budget": 1}
    assert out["declines"] == {"budget": ROUNDS}
    assert 0 < out["final"]["epsilon"] <= 3.0

    # The ledger of every virtual device that trained holds its own spend, within budget.
    for i in range(DEVICES):
        ledger = _ledger(work, i)
        if i == SPENT:
            assert len(ledger.entries) == 1 and ledger.spent() == pytest.approx(before)
            continue
        assert [e.round for e in ledger.entries] == [1, 2]
        assert 0 < ledger.spent() <= 3.0 + 1e-6
    assert len(out["devices"]) == DEVICES - 1
    assert all(0 < d["epsilon"] <= 3.0 for d in out["devices"])

    # The global model was aggregated: the package is not the run's initial model.
    pkg = Path(out["package"])
    assert load_package(pkg).lineage["rounds"] == ROUNDS
    _, _, initial = run_settings({"seed": 1, "pretrain-epochs": 5}).initial_model()
    final = load_params(pkg / PARAMS_FILE)
    assert any(not np.allclose(a, b) for a, b in zip(final, initial.params, strict=True))
    assert out["final"]["accuracy"] > 0.8


def test_simulate_refuses_a_remote_superlink(tmp_path: Path) -> None:
    res = run_cli("train", "--simulate", "10", "--superlink", "127.0.0.1:1", "--work-dir",
                  str(tmp_path))
    assert res.returncode == 64
    assert "--simulate runs its own virtual devices" in res.stderr
