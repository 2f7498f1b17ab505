"""A mixed fleet: two emulated arm64 agents (cross/) and one native agent in one demo.

``edgefleet demo --arm-devices 2`` runs the real services (mosquitto with ACL, TUF
registry, ingest, scorer, SuperLink) and starts the last two agents inside emulated
Raspberry Pis. Asserted here, from the demo's report and independently from the fleet
store and the devices: every agent is in both DP rounds, answers sensor frames from its
pty with onnx-int8 or tflite-int8 on aarch64, its telemetry lands in the store, it
accepts the signed federated model and refuses the tampered next version.
Takes a few minutes of emulation (docs/arm64.md); the first run builds the rootfs cache.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from edgefleet.server.telemetry.store import Store
from tests.conftest import BIN
from tests.e2e.test_demo import _leftovers
from tests.support.cross import ensure_rootfs, run_in_device

pytestmark = [pytest.mark.arm, pytest.mark.slow, pytest.mark.e2e]

ARM = ["dev-02", "dev-03"]
ALL = ["dev-01", *ARM]


@pytest.mark.timeout(3000)
def test_arm_fleet(tmp_path: Path) -> None:
    """Two emulated arm64 agents and one native one (see the module docstring)."""
    rootfs = ensure_rootfs()  # a cold cache is built here, outside the demo's timing
    work = tmp_path / "d"  # the agents' Unix sockets live below: keep it short
    t0 = time.monotonic()
    proc = subprocess.run([str(BIN / "edgefleet"), "demo", "--devices", "3", "--arm-devices",
                           "2", "--rounds", "2", "--stream", "5", "--tampered-update",
                           "--workdir", str(work), "--json"],
                          capture_output=True, text=True, timeout=2700, check=False)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    print(f"mixed arm64 fleet demo: {elapsed:.0f} s; steps {r['timings_s']}")

    # The demo ran the last two agents in emulated devices, one per int8 runtime.
    assert sorted(r["arm"]["devices"]) == ARM
    assert {d["machine"] for d in r["arm"]["devices"].values()} == {"aarch64"}
    assert sorted(d["variant"] for d in r["arm"]["devices"].values()) == [
        "onnx-int8", "tflite-int8"]
    for name in ARM:  # independently: each device's own disk is an aarch64 system
        out = run_in_device(["uname", "-m"], rootfs=rootfs, state=work / "cross" / name)
        assert out.returncode == 0 and out.stdout.strip() == "aarch64", out.stderr
        log = (work / "logs" / f"agent-{name}.log").read_text()
        assert f"agent {name} started" in log

    # Both DP rounds had all three SuperNodes.
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    assert all(x["nodes"] == 3 and x["epsilon"] and x["epsilon"] > 0 for x in r["rounds"])
    spent = {d["device"]: d["epsilon"] for d in r["per_device"]}
    assert all(eps is not None and eps > 0 for eps in spent.values()), spent
    assert r["rounds"][-1]["accuracy"] > 0.8

    # Telemetry from every device is in the store, nothing lost or duplicated.
    tel = r["telemetry"]
    assert tel["published"] > 0 and tel["lost"] == 0 and tel["duplicated"] == 0
    st = Store(work / "fleet.db")
    try:
        rows = {d["device"]: st.device(d["device"]) for d in st.devices()}
    finally:
        st.close()
    assert sorted(rows) == ALL
    variant = {}
    for name, row in rows.items():
        assert row is not None and row["n_inferences"] > 0, name
        m = row["last_metrics"]
        assert m["local"] > 0, (name, m)  # answered frames from its pty on the device
        variant[name] = m["gauges"]["model_variant"]
        # The signed federated model was accepted; the tampered next one refused.
        assert f"{row['model_name']}@{row['model_version']}" != r["tampered"]["ref"]
        assert row["model_name"] == "digits-fl", name
        assert m["counters"].get("update_rejected_hash_mismatch", 0) >= 1, (name, m["counters"])
    assert variant["dev-03"] == "tflite-int8"
    assert variant["dev-02"] == "onnx-int8"
    assert r["tampered"]["refused_by"] == ALL
    assert [e["event"] for e in r["rollout"]] == ["canary", "promote"]
    assert r["rollout"][-1]["status"] == "promoted"
    assert not _leftovers(work)
