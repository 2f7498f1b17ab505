"""A/B slots, sandboxed trial, archive and ONNX checks, health-check and error-burst rollback."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.errors import ModelRejected, PackageError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.inference.serving import ServingModel, WatchPolicy
from edgefleet.device.runtime.archive import ArchiveLimits, extract_package, pack_package
from edgefleet.device.runtime.manifest import MANIFEST_NAME
from edgefleet.device.runtime.onnx_check import check_no_external_data
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.updates.installer import HealthPolicy
from edgefleet.device.updates.sandbox import TrialLimits, trial_load
from edgefleet.device.updates.slots import SlotStore
from edgefleet.device.wire.updates import Assignment
from edgefleet.server.registry.http import RegistryServer
from tests.support.updates import assign, make_device, make_registry, package_version

pytestmark = pytest.mark.timeout(120)


def _tar(members: dict[str, bytes], kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize(("members", "kind", "why"), [
    ({"/etc/x": b"1"}, tarfile.REGTYPE, "outside"),
    ({"a/../../x": b"1"}, tarfile.REGTYPE, "outside"),
    ({"link": b""}, tarfile.SYMTYPE, "not a regular file"),
    ({f"f{i}": b"1" for i in range(5)}, tarfile.REGTYPE, "more than"),
])
def test_archive_refuses_unsafe_members(tmp_path: Path, members: dict[str, bytes], kind: bytes,
                                        why: str) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar(members, kind))
    with pytest.raises(PackageError, match=why):
        extract_package(archive, tmp_path / "out", ArchiveLimits(max_members=4))
    assert not (tmp_path / "x").exists()


def test_archive_round_trip_and_byte_limit(tmp_path: Path, digits_package: Path) -> None:
    archive = pack_package(digits_package, tmp_path / "p.tar")
    out = extract_package(archive, tmp_path / "out")
    assert (out / MANIFEST_NAME).read_bytes() == (digits_package / MANIFEST_NAME).read_bytes()
    with pytest.raises(PackageError, match="more than 1000 bytes"):
        extract_package(archive, tmp_path / "out2", ArchiveLimits(max_total_bytes=1000))


def test_onnx_external_data_is_refused(tmp_path: Path, digits_package: Path) -> None:
    import onnx

    check_no_external_data(digits_package / "model_int8.onnx")
    model = onnx.load(str(digits_package / "model_fp32.onnx"))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    with pytest.raises(PackageError, match="external data"):
        check_no_external_data(tmp_path / "ext.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(PackageError, match="not a valid ONNX"):
        check_no_external_data(tmp_path / "junk.onnx")


def test_trial_load_reports_hangs_and_crashes(tmp_path: Path, digits_package: Path) -> None:
    assert trial_load(digits_package, ["onnx-int8"]).worst_diff["onnx-int8"] >= 0.0
    with pytest.raises(ModelRejected, match="hung"):
        trial_load(digits_package, ["onnx-int8"], TrialLimits(timeout_s=0.01))
    # An address-space limit far too small for the runtime: the child dies, we do not.
    with pytest.raises(ModelRejected, match="trial load"):
        trial_load(digits_package, ["onnx-int8"], TrialLimits(address_space_bytes=64 << 20))


@pytest.fixture
def registry_env(tmp_path: Path, digits_package: Path) -> Iterator[tuple[Any, str]]:
    reg = make_registry(tmp_path / "registry")
    for v in ("1.0.0", "1.1.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    yield reg, srv.url
    srv.stop()


def test_failed_health_check_rolls_back_and_reports(tmp_path: Path,
                                                    registry_env: tuple[Any, str]) -> None:
    reg, url = registry_env
    dev = make_device(tmp_path / "dev", reg, url)
    assert dev.updater.apply(assign("1.0.0")) == "activated"
    dev.updater.health = HealthPolicy(probe_inferences=5, max_p95_latency_ms=0.0)
    with pytest.raises(ModelRejected, match="health check failed"):
        dev.updater.apply(assign("1.1.0"))
    assert dev.serving.active is not None and dev.serving.active.manifest.version == "1.0.0"
    assert [k for k, _ in dev.events][-2:] == ["rolled_back", "rejected"]
    _slot, info = dev.updater.slots.active()
    assert info is not None and info.version == "1.0.0"
    assert dev.updater.slots.pointer()["probation"] is False
    # After a restart the device still serves 1.0.0, verified.
    again = make_device(tmp_path / "dev", reg, url)
    assert again.serving.active is not None
    assert again.serving.active.manifest.version == "1.0.0"


def test_error_burst_after_activation_rolls_back(tmp_path: Path,
                                                 registry_env: tuple[Any, str]) -> None:
    reg, url = registry_env
    dev = make_device(tmp_path / "dev", reg, url)
    dev.updater.apply(assign("1.0.0"))
    dev.serving.policy = WatchPolicy(watch_inferences=50, max_errors=3)
    dev.updater.apply(assign("1.1.0"))
    new = dev.serving.active
    assert new is not None and new.manifest.version == "1.1.0"
    calls = {"n": 0}

    def broken(_x: Any) -> Any:
        calls["n"] += 1
        raise RuntimeError("runtime fault")

    new._run_raw = broken  # type: ignore[method-assign]  # the new model starts failing
    sample = np.asarray(new.manifest.golden[0].input, dtype=np.float32)
    answers = [dev.serving.predict(sample) for _ in range(10)]
    assert all(a.label == new.manifest.golden[0].label for a in answers)  # served by 1.0.0
    assert dev.serving.active is not None and dev.serving.active.manifest.version == "1.0.0"
    assert calls["n"] == 3
    assert dev.events[-1][0] == "rolled_back" and "3 errors" in dev.events[-1][1]["reason"]
    assert dev.updater.slots.active()[1].version == "1.0.0"  # type: ignore[union-attr]
    assert dev.metrics.counter("inference_errors") == 3


def test_recover_skips_a_corrupted_active_slot(tmp_path: Path,
                                               registry_env: tuple[Any, str]) -> None:
    reg, url = registry_env
    dev = make_device(tmp_path / "dev", reg, url)
    dev.updater.apply(assign("1.0.0"))
    dev.updater.apply(assign("1.1.0"))
    slots = SlotStore(tmp_path / "dev")
    slot, _ = slots.active()
    assert slot is not None
    model = slots.path(slot) / "model_int8.onnx"
    model.write_bytes(model.read_bytes()[:-10])  # bit rot in the active slot
    rec = slots.recover()
    assert rec.event == "active_corrupt" and rec.info is not None
    assert rec.info.version == "1.0.0"
    assert Predictor.load(slots.path(rec.slot), threads=1).manifest.version == "1.0.0"  # type: ignore[arg-type]


def test_shadow_changes_no_answer(tmp_path: Path, registry_env: tuple[Any, str]) -> None:
    reg, url = registry_env
    dev = make_device(tmp_path / "dev", reg, url)
    dev.updater.apply(assign("1.0.0"))
    assert dev.updater.apply(Assignment("digits-mlp", "1.1.0", shadow=True)) == "shadow"
    assert dev.serving.active is not None and dev.serving.active.manifest.version == "1.0.0"
    assert dev.updater.slots.active()[1].version == "1.0.0"  # type: ignore[union-attr]
    m = dev.serving.active.manifest
    for g in m.golden:
        assert dev.serving.predict(np.asarray(g.input, dtype=np.float32)).label == g.label
    assert dev.serving.shadow_agreement() == 1.0
    assert dev.metrics.counter("shadow_inferences") == len(m.golden)
    # Promotion then reuses the staged slot (no second download).
    assert dev.updater.apply(assign("1.1.0")) == "activated"
    assert dev.serving.shadow is None


def test_assignment_validation() -> None:
    with pytest.raises(Exception, match="bad model name"):
        Assignment.from_dict({"model": "../x", "version": "1.0.0"})
    with pytest.raises(Exception, match="bad version"):
        Assignment.from_dict({"model": "m", "version": "1.0.0; rm"})
    a = Assignment.from_dict(json.loads('{"model": "m", "version": "2.0", "shadow": true}'))
    assert a.target == "m/2.0.tar" and a.shadow


def test_serving_without_previous_raises_a_model_error() -> None:
    serving = ServingModel(Metrics())
    with pytest.raises(Exception, match="no model is active"):
        serving.predict(np.zeros(64, dtype=np.float32))
