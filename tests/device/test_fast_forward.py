"""Fast-forward attacks and the recovery the TUF specification prescribes (issue 19, item 3).

Against a real loopback registry: someone holding a role's key pushes that role to
version 10**6; every device that saw it raises its floor there. The repository recovers
as TUF 5.3.11 says (``recover_fast_forward``: rotate the keys in a new root, restart at
version 1), and the device drops exactly the floors the rotated keys raised, installs
the next model and serves on. Without the rotation, the same lower versions are still a
rollback.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tuf.api.metadata import Metadata, Root

from edgefleet.device.core import errors
from edgefleet.device.updates.tuf_client import (
    RESETS,
    HighestSeen,
    TufClient,
    rotated_roles,
)
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.registry.repository import Registry
from edgefleet.server.registry.tuf_repo import RECOVERY, TufRepo
from tests.support.updates import (
    HUGE,
    Device,
    Traffic,
    assign,
    fast_forward,
    golden_input,
    make_device,
    make_registry,
    package_version,
)

pytestmark = pytest.mark.timeout(180)

ROLES = ("timestamp", "snapshot", "targets")


def restart_without_rotation(repo: TufRepo, role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same restart at version 1, but with the keys that signed the huge versions."""
    with monkeypatch.context() as m:
        m.setattr(repo, "_rotate_keys", lambda roles: {})
        repo.recover_fast_forward(role)


class Bench:
    def __init__(self, tmp: Path, pkg: Path) -> None:
        self.tmp, self.src = tmp, pkg
        self.reg: Registry = make_registry(tmp / "registry")
        self.push("1.0.0")
        self.srv = RegistryServer(self.reg.repo.metadata_dir, self.reg.artifacts).start()
        self.dev: Device = make_device(tmp / "device", self.reg, self.srv.url)
        assert self.dev.updater.apply(assign("1.0.0")) == "activated"

    def push(self, version: str) -> None:
        self.reg.push(package_version(self.src, self.tmp / "pkgs" / version, version))

    def floors(self) -> dict[str, int]:
        return dict(HighestSeen(self.dev.state / "highest_seen.json").versions)

    def serving(self) -> str:
        assert self.dev.serving.active is not None
        return self.dev.serving.active.manifest.version

    def sample(self) -> np.ndarray:
        return golden_input(self.src)

    def close(self) -> None:
        self.srv.stop()
        self.reg.close()


@pytest.fixture
def bench(tmp_path: Path, digits_package: Path) -> Iterator[Bench]:
    b = Bench(tmp_path, digits_package)
    yield b
    b.close()


@pytest.mark.parametrize("role", ROLES)
def test_device_recovers_from_a_fast_forward_after_key_rotation(bench: Bench, role: str) -> None:
    fast_forward(bench.reg.repo, role)
    bench.dev.updater.tuf.refresh()
    assert bench.floors()[role] == HUGE  # the device believed the attacker
    before = bench.floors()

    keyids = bench.reg.repo.recover_fast_forward(role)
    assert set(keyids) == set(RECOVERY[role][0])
    for restarted in RECOVERY[role][1]:
        assert bench.reg.repo.open(restarted).signed.version == 1
    assert list((bench.reg.repo.metadata_dir.parent / "fast-forward").iterdir())
    bench.push("1.1.0")

    with Traffic(bench.dev.serving, bench.sample()) as traffic:
        assert bench.dev.updater.apply(assign("1.1.0")) == "activated"
    assert traffic.failed == 0 and traffic.ok > 0
    assert bench.serving() == "1.1.0"
    after = bench.floors()
    assert after[role] < HUGE
    # The fleet learns of it: one event naming the rotated roles, and a counter.
    resets = [d for kind, d in bench.dev.events if kind == "floors_reset"]
    assert resets == [{"root_version": 2, "rotated": sorted(RECOVERY[role][0]),
                       "reset": sorted({r for x in RECOVERY[role][0] for r in RESETS[x]})}]
    assert bench.dev.metrics.counter("update_floors_reset") == 1
    assert after["root"] == before["root"] + 1
    reset = {r for rotated in RECOVERY[role][0] for r in RESETS[rotated]}
    for other in set(ROLES) - reset:  # floors of keys that did not rotate stay
        assert after[other] >= before[other]
    # And the recovered device keeps following the repository.
    bench.push("1.2.0")
    assert bench.dev.updater.apply(assign("1.2.0")) == "activated"


@pytest.mark.parametrize("role", ROLES)
def test_restart_without_rotation_is_still_a_rollback(bench: Bench, role: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    fast_forward(bench.reg.repo, role)
    bench.dev.updater.tuf.refresh()
    restart_without_rotation(bench.reg.repo, role, monkeypatch)
    bench.push("1.1.0")
    for wiped_cache in (False, True):  # ngclient's cache refuses it, then our floor alone
        if wiped_cache:
            shutil.rmtree(bench.dev.state / "tuf")
        with pytest.raises(errors.RollbackRejected):
            bench.dev.updater.apply(assign("1.1.0"))
        kind, data = bench.dev.events[-1]
        assert kind == "rejected" and data["reason"] == "rollback", bench.dev.events[-1]
        assert bench.serving() == "1.0.0"
        assert bench.floors()[role] == HUGE
    assert bench.dev.metrics.counter("update_rejected_rollback") == 2
    assert bench.dev.metrics.counter("update_floors_reset") == 0  # nothing rotated


def test_floor_reset_survives_a_crash_before_it_is_written(bench: Bench,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """ngclient persists the new root before we reset the floors; a power cut in between
    must not leave the device refusing the recovered repository forever."""
    fast_forward(bench.reg.repo, "snapshot")
    bench.dev.updater.tuf.refresh()
    bench.reg.repo.recover_fast_forward("snapshot")

    def cut(self: HighestSeen, root: Root, resets: object = ()) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(HighestSeen, "adopt_root", cut)
        with pytest.raises(errors.UpdateUnavailable):
            bench.dev.updater.tuf.refresh()
    trusted = Metadata[Root].from_bytes((bench.dev.state / "tuf" / "root.json").read_bytes())
    assert trusted.signed.version == 2  # the new root was already persisted
    assert bench.floors()["snapshot"] == HUGE
    # The next start: a new client on the same state folder recovers.
    tuf = TufClient(bench.dev.state, bench.dev.updater.tuf.config,
                    bench.reg.repo.root_bytes(1))
    tuf.refresh()
    assert bench.floors()["snapshot"] < HUGE


def test_plain_rotation_resets_only_what_the_spec_says(bench: Bench) -> None:
    """A routine ``keys rotate targets`` (no attack) resets the targets floor only."""
    tuf: TufClient = bench.dev.updater.tuf
    tuf.refresh()
    old = Metadata[Root].from_bytes((bench.dev.state / "tuf" / "root.json").read_bytes()).signed
    recorded = tuf.highest.root_keys
    assert recorded is not None and rotated_roles(recorded, old) == set()
    bench.reg.repo.rotate("targets")
    new = bench.reg.repo.root()
    assert rotated_roles(recorded, new) == {"targets"}
    bench.push("1.1.0")
    assert bench.dev.updater.apply(assign("1.1.0")) == "activated"
    assert [d for kind, d in bench.dev.events if kind == "floors_reset"] == [
        {"root_version": 2, "rotated": ["targets"], "reset": ["targets"]}]
    assert tuf.highest.root_keys is not None
    assert rotated_roles(tuf.highest.root_keys, new) == set()


def test_only_keyids_and_threshold_count_as_rotation(bench: Bench) -> None:
    root = bench.reg.repo.root()
    keys = {r: {"keyids": sorted(root.roles[r].keyids), "threshold": root.roles[r].threshold}
            for r in RESETS}
    assert rotated_roles(keys, root) == set()
    assert rotated_roles({**keys, "snapshot": {**keys["snapshot"], "threshold": 2}},
                         root) == {"snapshot"}
    assert RESETS["timestamp"] == RESETS["snapshot"] == ("timestamp", "snapshot")
    assert RESETS["targets"] == ("targets",)


def test_root_has_no_fast_forward_recovery(bench: Bench) -> None:
    with pytest.raises(errors.ConfigError, match="root versions never restart"):
        bench.reg.repo.recover_fast_forward("root")


def test_cli_recovers_and_audits(tmp_path: Path, digits_package: Path) -> None:
    from tests.conftest import run_cli

    home = tmp_path / "registry"
    reg = make_registry(home)
    fast_forward(reg.repo, "timestamp")
    reg.close()
    res = run_cli("keys", "rotate", "timestamp", "--recover-fast-forward", "--json",
                  "--registry", str(home))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["recover_fast_forward"] is True and out["root_version"] == 2
    ts = Metadata.from_bytes((home / "repo" / "metadata" / "timestamp.json").read_bytes())
    assert ts.signed.version == 1
    res = run_cli("keys", "rotate", "root", "--recover-fast-forward", "--registry", str(home))
    assert res.returncode == 78 and "never restart" in res.stderr
    entries = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    assert [e["action"] for e in entries][-1] == "keys.rotate"
    assert entries[-1]["details"]["recover_fast_forward"] is True
