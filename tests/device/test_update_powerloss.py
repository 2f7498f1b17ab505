"""Power loss during an update: SIGKILL the updater at every step and at random moments.

After every kill the device restarts (slot recovery), and must serve a model that
verifies (sha256 of every file, golden inputs), and the highest metadata versions it
has seen must never go down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.updates.installer import FAULT_STEPS
from edgefleet.device.updates.slots import SlotStore
from tests.support.updates import make_registry, package_version

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(600)]

VERSIONS = ("1.0.0", "1.1.0", "1.2.0")
BIN = Path(sys.executable).parent / "edgefleet-agent"
REPO = Path(__file__).resolve().parents[2]


def _once(state: Path, url: str, root: Path, version: str,
          fault: str | None = None) -> subprocess.Popen[bytes]:
    args = ["update", "once", f"digits-mlp@{version}", "--state", str(state), "--repo", url,
            "--root", str(root), "--timeout", "5", "--rollback"]  # cycles down too
    if fault is None:
        return subprocess.Popen([str(BIN), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "tests.support.crash_at", fault, *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _restart_and_check(state: Path, floor: dict[str, Any]) -> dict[str, Any]:
    """What a restart does, then the invariants; returns the new floor."""
    slots = SlotStore(state)
    rec = slots.recover()
    assert rec.slot is not None and rec.info is not None, rec
    served = Predictor.load(slots.path(rec.slot), threads=1)  # sha256 + golden inputs
    assert served.manifest.version in VERSIONS
    assert served.manifest.version == rec.info.version
    assert not [p for p in (state / "slots").iterdir() if p.name.startswith(".")]
    seen = json.loads((state / "highest_seen.json").read_text())
    for role, v in floor.items():
        if role == "model":
            assert _key(seen["models"]["digits-mlp"]) >= v, (seen, floor)
        else:
            assert seen[role] >= v, (role, seen, floor)
    # the role floors (not the model versions or the root keys they were raised under)
    out: dict[str, Any] = {k: int(v) for k, v in seen.items()
                           if k not in ("models", "root_keys")}
    if "digits-mlp" in seen.get("models", {}):
        out["model"] = _key(seen["models"]["digits-mlp"])
    return out


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def test_sigkill_at_every_step_and_at_random_points(tmp_path: Path,
                                                    digits_package: Path) -> None:
    reg = make_registry(tmp_path / "registry")
    for v in VERSIONS:
        reg.push(package_version(digits_package, tmp_path / "pkgs" / v, v))
    from edgefleet.server.registry.http import RegistryServer

    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts).start()
    root = tmp_path / "root.json"
    root.write_bytes(reg.repo.root_bytes(1))
    state = tmp_path / "device"
    first = _once(state, srv.url, root, VERSIONS[0])
    assert first.wait(60) == 0, first.stderr.read() if first.stderr else ""
    floor = _restart_and_check(state, {})

    t0 = time.monotonic()
    timing = _once(state, srv.url, root, VERSIONS[1])
    assert timing.wait(60) == 0
    full = time.monotonic() - t0
    floor = _restart_and_check(state, floor)

    seed = int(os.environ.get("EDGEFLEET_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed={seed} full_update_s={full:.2f}")
    trials = killed = 0
    # Every step, twice (towards two different versions), then random moments.
    plan: list[tuple[str | None, float | None]] = [(s, None) for s in FAULT_STEPS for _ in (0, 1)]
    plan += [(None, rng.uniform(0.0, full * 1.2)) for _ in range(32)]
    for i, (step, at) in enumerate(plan):
        version = VERSIONS[i % len(VERSIONS)]
        proc = _once(state, srv.url, root, version, fault=step)
        if at is not None:
            try:
                proc.wait(at)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        rc = proc.wait(60)
        killed += rc == -signal.SIGKILL
        assert rc in (0, -signal.SIGKILL), (step, rc, proc.stderr.read() if proc.stderr else "")
        floor = _restart_and_check(state, floor)
        trials += 1
    assert trials >= 50
    assert killed >= len(FAULT_STEPS)  # the step kills really happened
    final = _once(state, srv.url, root, VERSIONS[2])
    assert final.wait(60) == 0
    assert _restart_and_check(state, floor)
    status = subprocess.run([str(BIN), "update", "status", "--state", str(state), "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["verified_version"] == VERSIONS[2]
    srv.stop()
    print(f"trials={trials} killed={killed}")
