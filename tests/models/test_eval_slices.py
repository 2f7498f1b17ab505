"""``models eval`` shows accuracy per class in its table, matching its ``--json`` figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_eval_table_shows_every_class_and_the_worst(tmp_path: Path) -> None:
    pkg = tmp_path / "digits"
    res = run_cli("models", "build", "--task", "digits", "--hidden", "8", "--format", "onnx",
                  "--epochs", "3", "--out", str(pkg))
    assert res.returncode == 0, res.stderr
    data = json.loads(run_cli("models", "eval", str(pkg), "--json", "--runs", "10").stdout)
    per_class = data["onnx-int8"]["per_class_accuracy"]
    assert sorted(per_class) == [str(i) for i in range(10)]
    table = run_cli("models", "eval", str(pkg), "--runs", "10", env={"COLUMNS": "120"})
    assert table.returncode == 0, table.stderr
    assert "accuracy per class" in table.stdout
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines()
            if line.count("│") == 4 and line.split("│")[1].strip().isdigit()}
    assert sorted(rows) == sorted(per_class)
    for label, acc in per_class.items():
        assert f"{acc:.4f}" in rows[label]
    worst = min(per_class, key=lambda k: per_class[k])
    assert f"onnx-int8 {worst}" in table.stdout.splitlines()[-1]
