"""``edgefleet report --fl-db``: accuracy per device of federated runs, from the FL store."""

from __future__ import annotations

import json
from pathlib import Path

from edgefleet.server.fl.store import FlStore, RoundRow
from edgefleet.server.telemetry.store import open_store
from tests.conftest import run_cli

BIG_NODE = 18_000_000_000_000_000_000  # Flower node ids are unsigned 64-bit


def test_report_shows_per_device_spread_and_worst_node(tmp_path: Path) -> None:
    open_store(tmp_path / "fleet.db")
    fl = FlStore(tmp_path / "fl.db")
    fl.start_run("r1", "1", {"strategy": "trimmed"})
    fl.add_device_evals("r1", 1, {11: (0.5, 20), 12: (0.6, 20), BIG_NODE: (0.4, 20)})
    fl.add_device_evals("r1", 2, {11: (0.9, 20), 12: (0.8, 20), BIG_NODE: (0.55, 20)})
    for r, declines in ((1, {"policy": 2, "budget": 1}), (2, {"policy": 2, "ledger": 1})):
        fl.add_round("r1", RoundRow(r, 0.8, 0.5, 3, sum(declines.values()), 0, 1.0, None, 1.0,
                                    10, 10, declines))
    assert fl.rounds("r1")[1].declines == {"policy": 2, "ledger": 1}
    fl.finish_run("r1", {"accuracy": 0.8})
    fl.start_run("r0", "0", {"strategy": "fedavg"})  # a run without federated evaluation
    assert fl.device_evals("r1")[2] == {"11": 0.9, "12": 0.8, str(BIG_NODE): 0.55}

    out = tmp_path / "report"
    res = run_cli("report", "--db", str(tmp_path / "fleet.db"), "--fl-db",
                  str(tmp_path / "fl.db"), "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert "fl_devices.png" in json.loads(res.stdout)["files"]
    assert (out / "fl_devices.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    row = ("<tr><td>r1</td><td>finished</td><td>trimmed</td><td>2</td><td>3</td>"
           f"<td>0.550</td><td>0.800</td><td>0.900</td><td>{BIG_NODE}</td>"
           "<td>1</td><td>4</td><td>1</td></tr>")
    assert row in page
    assert "<td>r0</td><td>running</td><td>fedavg</td><td>-</td>" in page


def test_report_without_fl_store_says_so(tmp_path: Path) -> None:
    open_store(tmp_path / "fleet.db")
    res = run_cli("report", "--db", str(tmp_path / "fleet.db"), "--fl-db",
                  str(tmp_path / "absent.db"), "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "no FL store at" in (tmp_path / "r" / "index.html").read_text()
    assert not (tmp_path / "absent.db").exists()


def test_train_names_the_reasons_devices_declined() -> None:
    from edgefleet.server.cli.train_cmd import describe_declines, embedded_policy
    from edgefleet.server.fl.store import declines_by_reason

    rows = [RoundRow(r, 0.5, 0.5, 1, 2, 0, 1.0, None, 1.0, 1, 1, d)
            for r, d in ((1, {"policy": 1, "budget": 1}), (2, {"policy": 1, "ledger": 1}))]
    assert declines_by_reason(rows) == {"policy": 2, "budget": 1, "ledger": 1}
    assert describe_declines({"policy": 2, "budget": 1}) == (
        "2 × outside the device's privacy policy, 1 × privacy budget spent")
    assert embedded_policy("off", 8.0)["privacy-min-mode"] == "off"
    assert embedded_policy("sample", 8.0)["privacy-max-run-epsilon"] == 8.0
