"""The fleet's Flower-app signature, checked by Flower's own FAB verification."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from edgefleet.device.fl.supernode import install_signature_hook
from edgefleet.device.wire.app_trust import SIGNATURE_KEY, AppSignature
from edgefleet.server.fl.runner import write_flower_app
from edgefleet.server.fleet.app_signing import build_fab, load_or_create


def _fab(content: bytes, sig: AppSignature | None) -> Fab:
    ver = {"valid_license": "Valid", **(sig.verification() if sig else {})}
    return Fab("h", content, ver)


def test_flower_verifies_our_signature_and_only_with_our_key(tmp_path: Path) -> None:
    key, other = load_or_create(tmp_path / "k"), load_or_create(tmp_path / "o")
    assert load_or_create(tmp_path / "k").key_id == key.key_id  # stable on disk
    assert (tmp_path / "k" / "app.key").stat().st_mode & 0o777 == 0o600
    fab = build_fab(write_flower_app(tmp_path / "app"))
    assert fab == build_fab(tmp_path / "app")  # what `flwr run` sends is reproducible
    trusted = yaml.safe_load(key.trusted_entities())
    assert list(trusted) == [key.key_id]
    assert _verify_fab(_fab(fab, key.sign(fab)), trusted)
    assert not _verify_fab(_fab(fab, None), trusted)
    assert not _verify_fab(_fab(fab, other.sign(fab)), trusted)
    assert not _verify_fab(_fab(fab + b"x", key.sign(fab)), trusted)  # other bytes
    forged = AppSignature(key.key_id, 1, other.sign(fab, 1).signature)
    assert not _verify_fab(_fab(fab, forged), trusted)


def test_signature_record_round_trips_through_the_run_config(tmp_path: Path) -> None:
    sig = load_or_create(tmp_path / "k").sign(b"fab", 1700000000)
    assert AppSignature.decode(sig.encode()) == sig
    key_id = sig.encode().split(".")[0]
    # a hostile SuperLink's run config: never an exception, only "no record"
    for bad in ("", "x", "a.b.c", "id.12.!!!", 5, None, "a b.1.AAAA",
                f"{key_id}.{'9' * 5000}.AAAA", f"{key_id}.².AAAA",
                f"{key_id}.1.{'A' * 100_000}", f"{key_id}\n.1.AAAA", f"{key_id}.1.AAAA\n"):
        assert AppSignature.decode(bad) is None
    assert json.loads(sig.verification()[sig.key_id])["signed_at"] == 1700000000


def test_supernode_hook_turns_the_run_config_record_into_the_fab_verification(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supernode.start_client_internal as sci

    seen: dict[str, Any] = {}

    def fake_pull(**kw: Any) -> int:
        run = kw["get_run"](7)
        seen["fab"] = kw["get_fab"](run.fab_hash, 7)
        return 7

    monkeypatch.setattr(sci, "_pull_and_store_message", fake_pull)
    install_signature_hook()
    install_signature_hook()  # idempotent
    key = load_or_create(tmp_path / "k")
    record = key.sign(b"content").encode()
    run = SimpleNamespace(fab_hash="h", override_config={SIGNATURE_KEY: record})
    sci._pull_and_store_message(get_run=lambda rid: run,
                                get_fab=lambda h, rid: Fab(h, b"content", {}),
                                trusted_entities={key.key_id: key.public_openssh})
    fab = seen["fab"]
    assert fab.verifications["valid_license"] == "Valid"
    assert _verify_fab(fab, {key.key_id: key.public_openssh})
    run.override_config = {}
    sci._pull_and_store_message(get_run=lambda rid: run,
                                get_fab=lambda h, rid: Fab(h, b"content", {}),
                                trusted_entities={key.key_id: key.public_openssh})
    assert not _verify_fab(seen["fab"], {key.key_id: key.public_openssh})
