"""Packaging: one import root, no generic top-level names, a device install without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_help_and_version() -> None:
    for prog in ("edgefleet", "edgefleet-agent"):
        proc = run_cli("--version", program=prog)
        assert proc.returncode == 0 and proc.stdout.startswith("edgefleet ")
        proc = run_cli("--help", program=prog)
        assert proc.returncode == 0 and "Usage" in proc.stdout


@pytest.mark.slow
def test_wheel_has_only_the_edgefleet_root(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("edgefleet-*.whl"))
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"edgefleet", wheel.name.split("-py")[0] + ".dist-info"}
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module of every subpackage ships (pyproject lists subpackages one by one)
    sources = {f"edgefleet/{p.relative_to(ROOT).as_posix()}"
               for top in ("device", "server", "models") for p in (ROOT / top).rglob("*.py")}
    assert sources - names == set()
    assert "edgefleet/device/core/errors.py" in sources
    assert "edgefleet/__init__.py" not in names  # namespace package
    assert not any("fl_attack" in n for n in names)  # test-only code stays in tests/


@pytest.mark.slow
def test_device_extra_resolves_without_tensorflow(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
         "--report", str(report), f"{ROOT}[device]"],
        check=True, timeout=600,
    )
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"onnxruntime", "paho-mqtt", "pyserial", "flwr"} <= names
    assert not {n for n in names if n.startswith("tensorflow") or n in {"tf-keras", "keras"}}
