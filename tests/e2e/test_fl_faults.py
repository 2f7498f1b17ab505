"""A SuperNode killed mid-round, its rejoin, and a SuperLink restarted between runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.device.core.process import SupervisedProcess
from edgefleet.device.core.retry import Backoff
from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore
from edgefleet.server.fleet.superlink import flower_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.fault]


def _settings(tag: str, tmp: Path, rounds: int, timeout: int = 25) -> object:
    return run_settings({"tag": tag, "num-rounds": rounds, "dp": "sample", "epsilon": 8.0,
                         "min-nodes": 2, "num-nodes": 3, "seed": 3, "round-timeout": timeout,
                         "local-steps": 5, "db": str(tmp / "fl.db"), "formats": "onnx"})


@pytest.mark.timeout(800)
def test_killed_node_round_completes_node_rejoins_and_link_restart_keeps_state(
        tmp_path: Path) -> None:
    store = FlStore(tmp_path / "fl.db")
    # The budget is not under test here: room for 8 rounds at ε=8 whatever the sampling,
    # so run 2 sees all three nodes however many run-1 rounds each one trained in.
    with EmbeddedFederation(tmp_path / "fed", devices=3, secure=True,
                            node_config=lambda i: {"privacy-budget": 100.0,
                                                   "privacy-max-run-epsilon": 8.0}) as fed:
        # The SuperLink frees a killed node's session only when its heartbeat expires
        # (Flower: 60 s); until then the same key cannot activate again and
        # flower-supernode exits. The agent restarts it with backoff (SupervisedProcess),
        # as here, and enough rounds run for it to be sampled again.
        s1 = _settings("faults1", tmp_path, 7)
        run_id = submit_run(fed.conn, s1, tmp_path, signing_key=fed.app_key)  # type: ignore[arg-type]
        deadline = time.monotonic() + 120
        while not store.rounds("faults1") and time.monotonic() < deadline:
            time.sleep(0.2)  # round 0 (initial evaluation) stored: round 1 is starting
        time.sleep(1.0)
        fed.kill("node-2")  # SIGKILL the SuperNode and its ClientApp mid-round

        home = tmp_path / "fed" / "node-2"
        rejoin = SupervisedProcess("node-2", fed.node_args(2), env=flower_env(home),
                                   log_path=tmp_path / "fed" / "node-2-rejoin.log",
                                   backoff=Backoff(base=2.0, cap=5.0), max_restarts=100,
                                   window_s=600)

        def on_round(r: object) -> None:
            if getattr(r, "round", 0) == 1:
                rejoin.start()  # the device comes back with its registered key

        try:
            follow_run(store, "faults1", fed.conn, run_id, on_round, timeout=500)
            rounds = store.rounds("faults1")
            assert rounds[1].nodes == 2  # completed with the others (min nodes 2)
            assert rounds[1].failed >= 1
            assert max(r.nodes for r in rounds[2:]) == 3, rounds  # node 2 rejoined, trained
            ledger = json.loads((tmp_path / "fed" / "node-0" / "privacy-ledger.hwm")
                                .read_text())
            spent_before = ledger["epsilon"]

            # SuperLink restart: registered node keys and run history live in its database.
            fed.kill("superlink")
            fed.start_superlink()
            # Nodes find the new SuperLink on their own retry schedule; on a busy 2-core CI
            # machine that took longer than run 1's 25 s round, so a node that is merely
            # slow gets 120 s (one that never comes back still fails the assertion below).
            s2 = _settings("faults2", tmp_path, 1, timeout=120)
            run2 = submit_run(fed.conn, s2, tmp_path, signing_key=fed.app_key)  # type: ignore[arg-type]
            assert run2 != run_id
            follow_run(store, "faults2", fed.conn, run2, timeout=200)
            assert store.rounds("faults2")[1].nodes == 3
            ls = fed.conn.flwr("ls", "edgefleet", "--format", "json")
            ids = {r["run-id"] for r in json.loads(ls.stdout)["runs"]}
            assert {run_id, run2} <= ids  # the first run is still known after the restart
        finally:
            rejoin.stop()  # node 2 stays up through the second run, like a device would
    mark = json.loads((tmp_path / "fed" / "node-0" / "privacy-ledger.hwm").read_text())
    assert mark["epsilon"] > spent_before  # the budget only ever grows
    ledger = json.loads((tmp_path / "fed" / "node-0" / "privacy-ledger.json").read_text())
    assert mark["entries"] == len(ledger["entries"])
    assert {e["run_id"] for e in ledger["entries"]} == {run_id, run2}
