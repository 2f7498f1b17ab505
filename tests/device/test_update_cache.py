"""A device never downloads an archive it already holds with the right sha256 (issue 19,
item 5): the A/B slots are the cache, keyed by the signed target's sha256.

A real loopback registry records every request; re-applying an assignment whose archive
is already in a slot fetches signed metadata only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from edgefleet.device.updates.installer import Updater
from edgefleet.device.wire.updates import Assignment
from edgefleet.server.registry.http import RegistryHandler, RegistryServer
from edgefleet.server.registry.repository import Registry
from tests.support.updates import Device, assign, make_device, make_registry, package_version

pytestmark = pytest.mark.timeout(120)


class RecordingHandler(RegistryHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        super().do_GET()


def archives(paths: list[str]) -> list[str]:
    return [p for p in paths if p.startswith("/targets/")]


@pytest.fixture
def bench(tmp_path: Path, digits_package: Path) -> Iterator[tuple[Registry, Device, list[str]]]:
    reg = make_registry(tmp_path / "registry")
    for v in ("1.0.0", "1.1.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    paths: list[str] = []
    handler = type("H", (RecordingHandler,), {"paths": paths})
    srv = RegistryServer(reg.repo.metadata_dir, reg.artifacts, handler=handler).start()
    dev = make_device(tmp_path / "dev", reg, srv.url)
    assert dev.updater.apply(assign("1.0.0")) == "activated"
    yield reg, dev, paths
    srv.stop()
    reg.close()


def test_promoting_a_shadowed_version_downloads_only_metadata(
        bench: tuple[Registry, Device, list[str]]) -> None:
    _reg, dev, paths = bench
    paths.clear()
    assert dev.updater.apply(assign("1.1.0", shadow=True)) == "shadow"
    assert len(archives(paths)) == 1  # the first time it is fetched
    size = dev.updater.tuf.fetcher.received[next(u for u in dev.updater.tuf.fetcher.received
                                                 if "/targets/" in u)]
    assert size > 10_000

    paths.clear()
    assert dev.updater.apply(assign("1.1.0")) == "activated"  # promote: reuse the slot
    assert archives(paths) == [], paths
    assert any(p.endswith("timestamp.json") for p in paths)  # metadata was still checked

    # After a restart, the same: the slots are on disk, keyed by sha256.
    paths.clear()
    restarted = Updater(dev.state, dev.updater.tuf, dev.serving, metrics=dev.metrics)
    restarted.start()
    assert restarted.apply(assign("1.1.0")) == "current"
    # the other slot (below the highest seen: only as a rollback)
    assert restarted.apply(assign("1.0.0", shadow=True, rollback=True)) == "shadow"
    assert archives(paths) == [], paths


def test_a_held_archive_that_no_longer_verifies_is_fetched_again(
        bench: tuple[Registry, Device, list[str]]) -> None:
    _reg, dev, paths = bench
    assert dev.updater.apply(assign("1.1.0", shadow=True)) == "shadow"
    slot = dev.updater.slots.inactive()
    manifest = dev.updater.slots.path(slot) / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b" ")  # bit rot in the held copy
    paths.clear()
    assert dev.updater.apply(assign("1.1.0")) == "activated"
    assert len(archives(paths)) == 1


def test_a_shadow_of_the_active_version_downloads_nothing(
        bench: tuple[Registry, Device, list[str]]) -> None:
    """Shadowing the version already active would compare the model with itself: the
    device reports it ``current`` without a request, and a running shadow stops."""
    _reg, dev, paths = bench
    assert dev.updater.apply(assign("1.1.0", shadow=True)) == "shadow"
    assert dev.serving.shadow is not None
    paths.clear()
    assert dev.updater.apply(assign("1.0.0", shadow=True)) == "current"
    assert paths == []
    assert dev.serving.shadow is None
    active = dev.serving.active
    assert active is not None and active.manifest.version == "1.0.0"
    assert dev.metrics.counter("update_shadow_started") == 1  # only the real shadow


def test_a_shadow_below_the_highest_seen_needs_a_signed_rollback(
        bench: tuple[Registry, Device, list[str]]) -> None:
    """A shadow is never served, but the device still downloads and runs it on live
    inputs: the downgrade rule is the same as for an activation (docs/updates.md)."""
    from edgefleet.device.core.errors import UpdateRejected

    _reg, dev, paths = bench
    assert dev.updater.apply(assign("1.1.0")) == "activated"
    paths.clear()
    with pytest.raises(UpdateRejected) as info:
        dev.updater.apply(assign("1.0.0", shadow=True))
    assert info.value.reason == "downgrade_refused"
    assert dev.metrics.counter("update_rejected_downgrade_refused") == 1
    assert dev.serving.shadow is None and archives(paths) == []
    assert dev.updater.apply(assign("1.0.0", shadow=True, rollback=True)) == "shadow"
    assert dev.serving.shadow is not None
    assert dev.serving.shadow.manifest.version == "1.0.0"
    active = dev.serving.active
    assert active is not None and active.manifest.version == "1.1.0"


def test_an_active_version_the_director_hashes_differently_is_checked(
        bench: tuple[Registry, Device, list[str]]) -> None:
    """``current`` only when the director's sha256 is the held one; otherwise the
    assignment goes through TUF, which decides (here: it signs another sha256)."""
    from edgefleet.device.core.errors import UpdateRejected

    _reg, dev, paths = bench
    paths.clear()
    with pytest.raises(UpdateRejected) as info:
        dev.updater.apply(Assignment("digits-mlp", "1.0.0", sha256="00" * 32))
    assert info.value.reason == "hash_mismatch"
    assert archives(paths) == [] and any(p.endswith("timestamp.json") for p in paths)
