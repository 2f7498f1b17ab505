"""Agents train on what they stored: real ``edgefleet-agent run`` processes, each with its
SuperNode (TLS, node authentication), one Flower run.

Two agents hold different samples (imported with ``edgefleet-agent data import``, one
store sealed with its key); a third has an empty store. Every round the empty one
declines with its own reason, and the two others evaluate on their own held-out samples:
the example counts are exactly their stores' held-out splits and the accuracies differ.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.agent.settings import load_agent_config
from edgefleet.device.core.process import ProcessGroup
from edgefleet.device.data.store import SampleStore, held_out, load_key, new_key
from edgefleet.device.privacy.ledger import LEDGER_FILE, PrivacyLedger
from edgefleet.models.core.tasks import get_task
from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore
from edgefleet.server.fleet.broker import free_port
from edgefleet.server.fleet.pki import init_certs
from tests.conftest import BIN, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _config(path: Path, name: str, state: Path, package: Path, fed: EmbeddedFederation,
            i: int) -> Path:
    assert fed.certs is not None
    path.write_text("\n".join([
        f'device_id = "{name}"', f'state_dir = "{state}"',
        "[model]", f'package = "{package}"', "threads = 1",
        "[telemetry]", "enabled = false",
        "[fallback]", 'mode = "off"',
        "[data]", "min_samples = 20",
        "[fl]", "enabled = true", f'superlink = "127.0.0.1:{fed.port}"',
        f'root_certificates = "{fed.certs.ca}"',
        f'auth_private_key = "{fed.certs.node_keys[i]}"', f"runtime_port = {free_port()}",
        # Stored samples are private: per-device evaluation is released noised and
        # accounted (the policy's default is off), inside this run's ε allowance.
        "[fl.privacy]", 'evaluation = "noised"', "max_run_epsilon = 8.0",
    ]) + "\n")
    return path


@pytest.mark.timeout(600)
def test_two_agents_train_on_their_own_stores_and_an_empty_one_declines(
        tmp_path: Path, digits_package: Path) -> None:
    split = get_task("digits").split()
    low = np.flatnonzero(split.y_train < 5)[:160]    # device A: digits 0-4
    high = np.flatnonzero(split.y_train >= 5)[:90]   # device B: digits 5-9, fewer
    procs = ProcessGroup(tmp_path / "logs")
    fed = EmbeddedFederation(tmp_path / "fed", devices=3, secure=True)
    fed.work.mkdir(parents=True)
    fed.certs = init_certs(fed.work / "certs", nodes=3)
    try:
        fed.start_superlink()
        expected: dict[str, int] = {}
        cfgs: dict[str, Path] = {}
        for i, (name, rows) in enumerate([("dev-a", low), ("dev-b", high), ("dev-c", None)]):
            fed.register(i)
            state = tmp_path / name
            state.mkdir()
            if name == "dev-a":  # as enrollment does: this store is sealed with its key
                new_key(state / "keys" / "sample-store.key")
            cfg = _config(tmp_path / f"{name}.toml", name, state, digits_package, fed, i)
            cfgs[name] = cfg
            # as enrollment does: the ledger exists from the start (missing later = refused)
            PrivacyLedger.initialize(load_agent_config(cfg).fl_state_dir / LEDGER_FILE)
            if rows is not None:
                npz = tmp_path / f"{name}.npz"
                np.savez(npz, x=split.x_train[rows], y=split.y_train[rows])
                res = run_cli("data", "import", str(npz), "-c", str(cfg), "--json",
                              program="edgefleet-agent")
                assert res.returncode == 0, res.stderr
                assert json.loads(res.stdout) == {"stored": len(rows), "refused": {}}
                key = state / "keys" / "sample-store.key"
                with SampleStore(state / "data" / "samples.db",
                                 key=load_key(key) if key.exists() else None) as st:
                    got = st.samples()
                    assert st.stats()["encrypted"] is (name == "dev-a")
                expected[name] = int(held_out(got.ids).sum())
            procs.start(name, [str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)])
        assert expected["dev-a"] != expected["dev-b"]
        assert not (tmp_path / "dev-a" / "data" / "samples.db").read_bytes().count(
            split.x_train[low[0]].astype("<f4").tobytes())

        s = run_settings({"tag": "own", "num-rounds": 2, "dp": "sample", "epsilon": 5.0,
                          "delta": 1e-5, "min-nodes": 3, "num-nodes": 3, "seed": 7,
                          "round-timeout": 150, "db": str(tmp_path / "fl.db"),
                          "out": str(tmp_path / "pkg"), "formats": "onnx"})
        store = FlStore(tmp_path / "fl.db")
        run_id = submit_run(fed.conn, s, tmp_path)
        run = follow_run(store, "own", fed.conn, run_id, timeout=480)
        rounds = store.rounds("own")
        assert [r.nodes for r in rounds[1:]] == [2, 2], (rounds, fed.log_tail("superlink"))
        assert [r.declined for r in rounds[1:]] == [1, 1]
        with sqlite3.connect(tmp_path / "fl.db") as db:
            evals = db.execute("SELECT round, node, accuracy, examples FROM fl_device_eval "
                               "WHERE tag = 'own' ORDER BY round, examples").fetchall()
        for rnd in (1, 2):
            rows_r = [r for r in evals if r[0] == rnd]
            # Each device evaluated on exactly its own store's held-out samples.
            assert sorted(r[3] for r in rows_r) == sorted(expected.values()), evals
            # two different evaluations: their accuracies are released with σ = 20 noise
            # (often clipped to 0 or 1 on a few dozen samples), their sizes are exact
            assert rows_r[0][3] != rows_r[1][3] and all(0 <= r[2] <= 1 for r in rows_r)
        # The empty store declined with its own reason, and never spent privacy budget.
        log_c = (tmp_path / "dev-c" / "supernode.log").read_text()
        assert "few samples: 0 stored" in log_c or "no samples" in log_c, log_c[-2000:]
        entries = {d: json.loads((tmp_path / d / "fl" / "privacy-ledger.json").read_text())
                   ["entries"] for d in ("dev-a", "dev-c")}
        assert entries["dev-c"] == [] and entries["dev-a"]
        # A device's own held-out accuracy of the final model, from its store.
        assert run.final is not None
        pkg = run.final["package"]
        final = {r[3]: r[2] for r in evals if r[0] == 2}
        for name in ("dev-a", "dev-b"):
            res = run_cli("data", "eval", str(pkg), "-c", str(cfgs[name]), "--json",
                          program="edgefleet-agent")
            assert res.returncode == 0, res.stderr
            out = json.loads(res.stdout)
            assert out["held_out"] == expected[name]
            # what was released is that accuracy plus the evaluation's Gaussian noise
            assert 0.0 <= out["accuracy"] <= 1.0 and expected[name] in final
    finally:
        procs.stop_all(20)
        fed.stop()


def test_the_sim_app_cannot_give_an_agent_built_in_data(tmp_path: Path) -> None:
    """With ``sample-store`` set (every agent sets it) the simulated devices' loader reads
    the store, never a built-in partition."""
    from edgefleet.device.fl.client import node_settings
    from edgefleet.device.fl.store_data import TooFewSamples
    from edgefleet.models.sim.fl_app import builtin_share

    s = node_settings({"sample-store": str(tmp_path / "none.db"), "partition-id": 0,
                       "num-partitions": 2})
    with pytest.raises(TooFewSamples):
        builtin_share(s)
