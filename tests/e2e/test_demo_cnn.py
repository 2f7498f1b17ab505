"""`edgefleet demo --model cnn`: a user's Keras CNN imported and its head fine-tuned with DP
on shifted devices, asserted on the report and the packages it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgefleet.device.runtime.manifest import load_package
from tests.conftest import BIN

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.mark.timeout(600)
def test_demo_cnn_fine_tunes_the_imported_head_with_dp(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([str(BIN / "edgefleet"), "demo", "--model", "cnn", "--devices", "3",
                           "--rounds", "2", "--epsilon", "3", "--workdir", str(work), "--json"],
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


def test_demo_refuses_an_unknown_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app

    res = CliRunner().invoke(app, ["demo", "--model", "resnet", "--workdir",
                                   str(tmp_path / "d")])
    assert res.exit_code == 2 and "mlp or cnn" in res.output
    assert not (tmp_path / "d").exists()
