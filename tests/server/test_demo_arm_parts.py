"""The pieces `edgefleet demo --arm-devices/--tampered-update` adds, without a fleet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.manifest import file_sha256
from edgefleet.models.sim.fl_app import export_partition
from edgefleet.models.sim.tamper import bump_version, corrupt_artifact, tampered_copy
from edgefleet.server.demo.arm import arm_variant, cross_dir
from tests.conftest import run_cli


@pytest.mark.parametrize(("old", "new"), [("1.0.3", "1.0.4"), ("2", "2.0.1"),
                                          ("1.2", "1.2.1"), ("0.9.9", "0.9.10")])
def test_bump_version(old: str, new: str) -> None:
    assert bump_version(old) == new


def test_tampered_copy_is_the_next_version_of_the_same_files(digits_package: Path,
                                                             tmp_path: Path) -> None:
    before = json.loads((digits_package / "manifest.json").read_text())
    version = tampered_copy(digits_package, tmp_path / "t")
    after = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert version == bump_version(before["version"]) == after["version"]
    assert after["files"] == before["files"]


def test_corrupt_artifact_changes_the_stored_hash(tmp_path: Path) -> None:
    art = tmp_path / "artifacts"
    art.mkdir()
    (art / "abc").write_bytes(bytes(range(256)) * 8)
    before = file_sha256(art / "abc")
    corrupt_artifact(tmp_path, "abc")
    assert file_sha256(art / "abc") != before
    assert (art / "abc").stat().st_size == 2048


def test_emulated_devices_alternate_the_int8_runtimes() -> None:
    assert [arm_variant(i) for i in range(3)] == ["onnx-int8", "tflite-int8", "onnx-int8"]


def test_export_partition_is_a_samples_file(tmp_path: Path) -> None:
    out = export_partition("digits", 1, 3, tmp_path / "s.npz")
    with np.load(out) as f:
        x, y = f["x"], f["y"]
    assert x.ndim == 2 and x.shape[0] == y.shape[0] > 10
    assert set(np.unique(y)) <= set(range(10))


def test_cross_dir_is_the_checkout_and_can_be_overridden(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (cross_dir() / "run.sh").is_file()
    monkeypatch.setenv("EDGEFLEET_CROSS_DIR", str(tmp_path))
    from edgefleet.device.core.errors import EdgefleetError

    with pytest.raises(EdgefleetError, match="EDGEFLEET_CROSS_DIR"):
        cross_dir()


def test_more_arm_devices_than_devices_is_a_one_line_error(tmp_path: Path) -> None:
    res = run_cli("demo", "--devices", "2", "--arm-devices", "3", "--workdir",
                  str(tmp_path / "w"), "--json")
    assert res.returncode != 0
    assert "--arm-devices" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "w").exists()
