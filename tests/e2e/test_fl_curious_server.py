"""A curious server on a real SuperLink: nothing it asks weakens the devices' protection.

Our real ServerApp, submitted to a real ``flower-superlink`` with two real
``flower-supernode`` processes holding the default device privacy policy (sample-level
DP at least, ε ≤ 5 per run, δ ≤ 1e-5) with the noise floor raised to σ ≥ 1. The server
asks for DP off, for ε above the policy, for a plan whose noise multiplier is below the
policy, and sends a seed twice: the first three are declined by every device with the
policy reason (counted, shown by ``edgefleet train --json``), no update is aggregated
(the global model does not move) and nothing enters the ledgers; the seed does not
reach the noise (two runs with the same seed and initial model give different models).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.privacy.ledger import PrivacyLedger
from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore, RoundRow
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DEVICES = 2


def _run(fed: EmbeddedFederation, store: FlStore, tmp: Path, tag: str,
         **ask: object) -> list[RoundRow]:
    s = run_settings({"tag": tag, "num-rounds": 1, "min-nodes": DEVICES, "num-nodes": DEVICES,
                      "round-timeout": 90, "local-steps": 2, "pretrain-epochs": 0,
                      "db": str(tmp / "fl.db"), **ask})
    follow_run(store, tag, fed.conn, submit_run(fed.conn, s, tmp), timeout=400)
    return store.rounds(tag)


@pytest.mark.timeout(1200)
def test_curious_server_gets_declines_and_no_unnoised_update(tmp_path: Path) -> None:
    store = FlStore(tmp_path / "fl.db")
    with EmbeddedFederation(tmp_path / "fed", devices=DEVICES, secure=False,
                            node_config=lambda _i: {"privacy-min-noise-multiplier": 1.0}) as fed:
        refused = {
            "off": {"dp": "off"},
            "eps": {"dp": "sample", "epsilon": 50.0},
            # ε within the policy, but two steps of one round: σ ≈ 0.6-0.7 < 1.
            "sigma": {"dp": "sample", "epsilon": 5.0, "local-steps": 2, "batch-size": 64},
        }
        for tag, ask in refused.items():
            rounds = _run(fed, store, tmp_path, tag, **ask)
            r0, r1 = rounds
            assert (r1.nodes, r1.declined, r1.declines) == (0, DEVICES, {"policy": DEVICES}), tag
            assert r1.accuracy == r0.accuracy and r1.loss == r0.loss, tag  # nothing aggregated
        nodes_log = "".join(fed.log_tail(f"node-{i}", 2000) for i in range(DEVICES))
        ledgers = [PrivacyLedger(tmp_path / "fed" / f"node-{i}" / "privacy-ledger.json", 10.0)
                   for i in range(DEVICES)]
        assert all(not led.entries for led in ledgers)

        # The same seed (and so the same initial model) twice: the noise differs anyway.
        seeded = [_run(fed, store, tmp_path, f"seed-{k}", dp="sample", epsilon=1.0, seed=7)
                  for k in "ab"]
        assert seeded[0][0].loss == seeded[1][0].loss  # same initial model
        assert all(r[1].nodes == DEVICES and not r[1].declined for r in seeded)
        assert seeded[0][1].loss != seeded[1][1].loss

        # What `edgefleet train` shows for a remote fleet whose devices refuse.
        res = run_cli("train", "--superlink", f"127.0.0.1:{fed.port}", "--devices",
                      str(DEVICES), "--rounds", "1", "--dp", "off", "--pretrain-epochs", "0",
                      "--format", "onnx", "--out", str(tmp_path / "pkg"), "--work-dir",
                      str(tmp_path / "cli"), "--json", timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["declines"] == {"policy": DEVICES}
    assert out["rounds"][0]["declines"] == {"policy": DEVICES}
    for i in range(DEVICES):
        entries = PrivacyLedger(tmp_path / "fed" / f"node-{i}" / "privacy-ledger.json",
                                10.0).entries
        assert len(entries) == 2 and all(e.kind == "train" for e in entries)
    print("curious-server declines:", {t: store.rounds(t)[1].declines for t in refused},
          "seeded losses:", [r[1].loss for r in seeded],
          "device ε:", [round(led.spent(), 3) for led in (
              PrivacyLedger(tmp_path / "fed" / f"node-{i}" / "privacy-ledger.json", 10.0)
              for i in range(DEVICES))])
    if "privacy policy" in nodes_log:  # the ClientApp's reason, where Flower keeps its log
        assert "noise multiplier" in nodes_log and "dp='off'" in nodes_log
