"""The director's key (created, rotated with a signed link) and its per-device sequence."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from edgefleet.device.core.errors import ConfigError
from edgefleet.device.wire import updates as wire
from edgefleet.server.fleet import director_key
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.rollout.director import Director
from edgefleet.server.rollout.schema import connect
from tests.conftest import run_cli
from tests.support.updates import make_registry

NOW = 1_700_000_000.0


def test_director_key_rotation_links_old_to_new(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    with pytest.raises(ConfigError, match="no director key"):
        director_key.load(ring)
    assert director_key.ensure(ring) and not director_key.ensure(ring)
    first = director_key.load(ring)
    assert director_key.read_public(director_key.public_file(ring.keys_dir)) == first.public_raw
    assert (ring.keys_dir / "director.pem").stat().st_mode & 0o777 == 0o600
    second = director_key.rotate(ring)
    third = director_key.rotate(ring)
    assert len({first.keyid, second.keyid, third.keyid}) == 3
    assert director_key.load(ring).keyid == third.keyid
    assert director_key.read_public(director_key.public_file(ring.keys_dir)) == third.public_raw
    assert len(list(ring.keys_dir.glob("director.*.retired.pem"))) == 2
    # A device that pinned the first key reaches the third through the chain.
    a = wire.Assignment("m", "1.0.0")
    sa = wire.decode_signed_assignment(wire.sign_assignment(
        a, device="pi-1", seq=1, expires=2**40, key=third.private, chain=third.chain))
    assert sa is not None and sa.verify(first.public_raw) == third.public_raw


def test_seq_is_above_what_was_signed_and_what_the_device_reports(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path / "keys")
    director_key.ensure(ring)
    db = connect(tmp_path)
    clock = [NOW]
    d = Director(director_key.load(ring), db, ttl_s=100, clock=lambda: clock[0])
    a = wire.Assignment("m", "1.0.0", sha256="cd" * 32)

    def seq(payload: bytes) -> int:
        return int(json.loads(payload)["signed"]["seq"])

    assert seq(d.sign("pi-1", a)) == 1
    assert seq(d.sign("pi-1", a, reported_seq=1)) == 2
    assert seq(d.sign("pi-1", a, reported_seq=40)) == 41  # a director that lost its rows
    assert seq(d.sign("pi-2", a)) == 1
    assert json.loads(d.sign("pi-2", a))["signed"]["expires"] == int(NOW + 100)
    assert d.assigned("pi-1") == a
    d.clear("pi-2")
    assert d.assigned("pi-2") is None and d.known("pi-2")

    published: list[tuple[str, bytes]] = []
    assert d.refresh(lambda t, p: published.append((t, p)), lambda _d: None) == []
    clock[0] = NOW + 60  # past half of the 100 s: re-signed, the cleared one is not
    assert d.refresh(lambda t, p: published.append((t, p)), lambda _d: None) == ["pi-1"]
    assert [t for t, _ in published] == [wire.device_topic("pi-1")]
    assert seq(published[0][1]) == 42
    db.close()
    with sqlite3.connect(tmp_path / "rollouts.db") as raw:
        assert raw.execute("SELECT seq FROM director_assignments WHERE device = 'pi-1'"
                           ).fetchone() == (42,)


def test_keys_cli_creates_shows_and_rotates_the_director_key(tmp_path: Path) -> None:
    env = {"EDGEFLEET_REGISTRY": str(tmp_path / "registry")}
    res = run_cli("keys", "init", "--json", env=env)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)["keys"]["director"]
    shown = json.loads(run_cli("keys", "show", "--json", env=env).stdout)
    assert shown["director"] == made and made not in json.dumps(shown["roles"])
    res = run_cli("keys", "rotate", "director", "--json", env=env)
    assert res.returncode == 0, res.stderr
    rotated = json.loads(res.stdout)
    assert rotated["keyid"] != made and rotated["chain"] == 1
    assert json.loads(run_cli("keys", "show", "--json", env=env).stdout)["director"] == \
        rotated["keyid"]
    reg = make_registry(tmp_path / "other")  # the test registries have one too
    assert director_key.load(reg.keys).keyid
    entries = [json.loads(x) for x in (tmp_path / "registry" / "audit.jsonl").read_text()
               .splitlines()]
    assert [e["details"]["role"] for e in entries if e["action"] == "keys.rotate"] == \
        ["director"]
