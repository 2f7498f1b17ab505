"""`edgefleet demo --model cnn`: a user's Keras CNN imported and its head fine-tuned with DP
on shifted devices, then both versions served by real agents fed by sensor simulators
with the same cameras (fleet-wide, canary, promote); asserted on the report, the packages
it wrote and the fleet's own store."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.runtime.manifest import load_package
from edgefleet.server.telemetry.store import Store
from tests.conftest import BIN
from tests.e2e.test_demo import _leftovers

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.timeout(600)
def test_demo_cnn_fine_tunes_the_imported_head_with_dp_and_serves_it_on_a_fleet(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "edgefleet"), "demo", "--model", "cnn", "--devices", "3",
                           "--rounds", "2", "--epsilon", "3", "--stream", "12",
                           "--workdir", str(work), "--json"],
                          capture_output=True, text=True, timeout=580, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["model"] == "cnn" and r["devices"] == 3 and r["rounds"] == 2
    assert [d["shift"] for d in r["per_device"]] == [
        "intensity=0.6,noise=2,rotation=15", "intensity=0.8,noise=1,thickness=0.6",
        "intensity=0.7,noise=3,rotation=-12,thickness=-0.3"]
    assert all(d["held_out"] > 100 and d["train"] == 800 for d in r["per_device"])
    # each device's own ledger: DP was spent, never more than the run asked for (plus the
    # small cost of the noised evaluations); σ is calibrated conservatively, so a 2-round
    # run spends less than its target
    assert all(0.5 < d["epsilon"] <= 3.1 for d in r["per_device"]), r["per_device"]
    assert r["epsilon_spent"] == max(d["epsilon"] for d in r["per_device"])
    # the shift costs the imported model accuracy: that is what the fine-tuning is for
    assert r["accuracy_unshifted"] > r["accuracy_before"]
    assert 0.0 < r["accuracy_after"] <= 1.0
    imported = load_package(Path(r["packages"]["imported"]))
    tuned = load_package(Path(r["packages"]["fine_tuned"]))
    assert (imported.version, tuned.version) == ("1.0.0", "1.0.1")
    assert tuned.lineage["fine_tuned"]["dp"]["mode"] == "sample"
    # the fine-tuned version's int8 TFLite variant is rebuilt from the kept Keras model
    assert set(tuned.variants) == set(imported.variants) == {"onnx-fp32", "onnx-int8",
                                                             "tflite-int8"}
    assert tuned.lineage["fine_tuned"]["tflite"]["rebuilt"] is True
    # the human-readable report of the same run
    from edgefleet.server.cli.demo_cmd import _print_cnn_report

    _print_cnn_report(r)
    out = capsys.readouterr().out
    assert "head fine-tuning at ε = 3" in out and "dev2" in out
    assert "on the fleet: 1.0.0 fleet-wide, 1.0.1 canary then promoted" in out
    assert "dev-03" in out and "canary cnn@1.0.1" in out
    _assert_fleet_part(r["fleet"], [d["shift"] for d in r["per_device"]])
    assert _leftovers(work) == []


def _assert_fleet_part(f: dict[str, Any], shifts: list[str]) -> None:
    """Both versions served by every agent, the canary before the promotion."""
    assert f["agents"] == 3 and f["versions"] == ["1.0.0", "1.0.1"]
    agents = [a["device"] for a in f["per_agent"]]
    assert agents == ["dev-01", "dev-02", "dev-03"]
    # each agent's sensor streams through its in-process twin's camera
    assert [a["shift"] for a in f["per_agent"]] == shifts
    events = [e["event"] for e in f["rollout"]]
    assert events == ["fleet", "canary", "promote"], f["rollout"]
    fleet, canary, promote = f["rollout"]
    assert fleet["version"] == "1.0.0" and fleet["serving"] == dict.fromkeys(agents,
                                                                             "cnn@1.0.0")
    # the canary ran 1.0.1 on one agent while the others still served 1.0.0
    assert canary["version"] == "1.0.1" and len(canary["devices"]) == 1
    (pilot,) = canary["devices"]
    assert canary["serving"] == {a: "cnn@1.0.1" if a == pilot else "cnn@1.0.0"
                                 for a in agents}
    assert promote["status"] == "promoted" and promote["id"] == canary["id"]
    for a in f["per_agent"]:
        # its labelled frames were answered by 1.0.0 first, then by 1.0.1
        assert a["served"] == ["1.0.0", "1.0.1"] and a["model"] == "cnn@1.0.1", a
        assert a["inferences"] > 0
        assert a["labelled_before"] > 0 and a["labelled_after"] > 0
        assert a["same_frames"] == a["labelled_before"] + a["labelled_after"]
        for key in ("accuracy_before", "accuracy_after", "same_frames_before",
                    "same_frames_after"):
            assert 0.0 < a[key] <= 1.0, (key, a)
    assert f["inferences"] == sum(a["inferences"] for a in f["per_agent"])
    assert all(0.0 < f[k] <= 1.0 for k in ("accuracy_before", "accuracy_after",
                                            "same_frames_before", "same_frames_after"))
    # the fleet's store saw what the report says: every agent online and on 1.0.1
    st = Store(Path(f["workdir"]) / "fleet.db")
    try:
        rows = {d["device"]: d for d in st.devices()}
    finally:
        st.close()
    assert sorted(rows) == agents
    assert all((d["model_name"], d["model_version"]) == ("cnn", "1.0.1") for d in rows.values())


@pytest.mark.timeout(300)
def test_demo_cnn_no_fleet_stays_in_process(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "edgefleet"), "demo", "--model", "cnn", "--devices", "2",
                           "--rounds", "1", "--no-fleet", "--workdir", str(work), "--json"],
                          capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["fleet"] is None and len(r["per_device"]) == 2
    assert not (work / "fleet-run").exists()


def test_demo_refuses_an_unknown_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app

    res = CliRunner().invoke(app, ["demo", "--model", "resnet", "--workdir",
                                   str(tmp_path / "d")])
    assert res.exit_code == 2 and "mlp or cnn" in res.output
    assert not (tmp_path / "d").exists()
