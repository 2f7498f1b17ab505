"""Real flower-superlink + 5 flower-supernode processes with TLS and node authentication.

One run of 3 rounds with sample-level DP: it completes, accuracy rises, ε equals what
dp-accounting computes for the events the devices report, a device over its budget
declines without stopping the run, and a SuperNode with an unregistered key is refused.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import dp_accounting as dpa
import pytest
from dp_accounting import pld

from edgefleet.device.privacy.accounting import PLD_DISCRETIZATION
from edgefleet.device.runtime.manifest import load_package
from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore
from edgefleet.server.fleet.pki import make_node_key
from edgefleet.server.fleet.superlink import flower_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _epsilon(events: list[dict[str, float]], delta: float) -> float:
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for e in events:
        acc.compose(dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(e["q"], dpa.GaussianDpEvent(e["sigma"])), int(e["steps"])))
    return float(acc.get_epsilon(delta))


@pytest.mark.timeout(420)
def test_dp_run_on_five_authenticated_supernodes(tmp_path: Path) -> None:
    budgets = {4: 1.0}  # device 4 cannot afford ε=3: it must decline every round
    with EmbeddedFederation(tmp_path / "fed", devices=5, secure=True,
                            node_config=lambda i: {"privacy-budget": budgets.get(i, 10.0)}) as fed:
        # An unknown key is refused by the SuperLink: the SuperNode gives up with an error.
        stranger = make_node_key(tmp_path / "stranger.key")
        with (tmp_path / "stranger.log").open("wb") as logf:
            proc = subprocess.Popen([*fed.node_args(0, key=stranger), "--max-retries", "2"],
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    env=flower_env(tmp_path / "stranger-home"))
            try:
                assert proc.wait(timeout=120) != 0
            finally:
                proc.kill()
        assert "No SuperNode found with the given public key" in fed.log_tail("superlink", 400)
        assert "could not establish a connection" in (tmp_path / "stranger.log").read_text()

        s = run_settings({"tag": "dp5", "num-rounds": 3, "dp": "sample", "epsilon": 3.0,
                          "delta": 1e-5, "min-nodes": 5, "num-nodes": 5, "seed": 7,
                          "round-timeout": 120, "db": str(tmp_path / "fl.db"),
                          "out": str(tmp_path / "pkg"), "formats": "onnx"})
        store = FlStore(tmp_path / "fl.db")
        run_id = submit_run(fed.conn, s, tmp_path, signing_key=fed.app_key)
        seen: list[int] = []
        run = follow_run(store, "dp5", fed.conn, run_id, lambda r: seen.append(r.round),
                         timeout=360)
    rounds = store.rounds("dp5")
    assert seen == [0, 1, 2, 3]
    assert [r.nodes for r in rounds[1:]] == [4, 4, 4]
    assert [r.declined for r in rounds[1:]] == [1, 1, 1]
    assert [r.declines for r in rounds[1:]] == [{"budget": 1}] * 3
    assert run.final is not None and run.final["declines"] == {"budget": 3}
    assert rounds[-1].accuracy is not None and rounds[0].accuracy is not None
    assert rounds[-1].accuracy > rounds[0].accuracy + 0.2
    eps = [r.epsilon for r in rounds[1:]]
    assert eps == sorted(eps)

    final = run.final
    assert final is not None
    devices = final["devices"]
    assert len(devices) == 4
    for d in devices:
        assert len(d["events"]) == 3
        assert d["epsilon"] == pytest.approx(_epsilon(d["events"], 1e-5), rel=1e-9)
    assert final["epsilon"] == pytest.approx(max(d["epsilon"] for d in devices), rel=1e-12)
    assert 2.9 < final["epsilon"] <= 3.0
    assert final["epsilon"] == pytest.approx(rounds[-1].epsilon)

    manifest = load_package(Path(final["package"]))
    assert manifest.lineage["dp"]["epsilon"] == pytest.approx(final["epsilon"])
    assert manifest.lineage["dp"]["delta"] == 1e-5
    assert manifest.lineage["rounds"] == 3
    assert manifest.lineage["node_count"] == 4
    assert manifest.lineage["flower_run_id"] == run_id
    # The declining device's ledger holds nothing: it never released an update.
    assert not (tmp_path / "fed" / "node-4" / "privacy-ledger.json").exists()
    assert (tmp_path / "fed" / "node-0" / "privacy-ledger.json").exists()
