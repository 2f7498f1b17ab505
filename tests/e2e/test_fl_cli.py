"""``edgefleet train`` end to end: embedded processes, client-level DP, one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.runtime.manifest import load_package
from tests.conftest import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.timeout(300)
def test_train_cli_client_dp_json(tmp_path: Path) -> None:
    res = run_cli("train", "--rounds", "2", "--devices", "3", "--dp", "client", "--epsilon", "8",
                  "--insecure", "--format", "onnx", "--seed", "1", "--work-dir",
                  str(tmp_path / "w"), "--out", str(tmp_path / "pkg"), "--json", timeout=280)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert [r["round"] for r in out["rounds"]] == [1, 2]
    assert all(r["nodes"] == 3 for r in out["rounds"])
    assert out["declines"] == {} and all(r["declines"] == {} for r in out["rounds"])
    assert 0 < out["final"]["epsilon"] <= 8.0
    assert out["final"]["delta"] == 1e-5
    assert out["rounds"][-1]["epsilon"] == pytest.approx(out["final"]["epsilon"])
    m = load_package(Path(out["package"]))
    assert m.lineage["dp"]["mode"] == "client"
    assert not list((tmp_path / "w" / "embedded").glob("node-*/privacy-ledger.json"))


def test_train_cli_rejects_bad_dp_mode(tmp_path: Path) -> None:
    res = run_cli("train", "--dp", "maybe", "--work-dir", str(tmp_path))
    assert res.returncode == 64
    assert "--dp must be" in res.stderr
