"""Signed Flower apps on a real SuperLink and real SuperNodes that trust only the fleet's key.

Three runs of the same app on one federation: unsigned, then signed with a key the
nodes do not trust, then signed with the fleet's key. The first two never execute on a
node (Flower's FAB verification answers with an error reply; no ClientApp starts, no
ledger entry is written) and the reason is in the SuperNode log; the third trains.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from edgefleet.server.fl.runner import EmbeddedFederation, follow_run, submit_run
from edgefleet.server.fl.settings import run_settings
from edgefleet.server.fl.store import FlStore
from edgefleet.server.fleet.app_signing import AppSigningKey, load_or_create
from edgefleet.server.fleet.superlink import FlRunError

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
NODES = 2


def _run(fed: EmbeddedFederation, tmp: Path, tag: str, key: AppSigningKey | None) -> str:
    """Submit and follow one run; the outcome as text (``completed`` or the error)."""
    s = run_settings({"tag": tag, "num-rounds": 1, "dp": "sample", "epsilon": 3.0,
                      "min-nodes": NODES, "num-nodes": NODES, "round-timeout": 150,
                      "pretrain-epochs": 0, "db": str(tmp / "fl.db"),
                      "out": str(tmp / f"pkg-{tag}"), "formats": "onnx"})
    store = FlStore(tmp / "fl.db")
    run_id = submit_run(fed.conn, s, tmp / tag, signing_key=key)
    try:
        follow_run(store, tag, fed.conn, run_id, timeout=400)
    except FlRunError as exc:
        return f"failed: {exc}"
    rounds = store.rounds(tag)
    return "completed" if rounds and rounds[-1].nodes == NODES else f"no training: {rounds}"


def _ledgers(fed: EmbeddedFederation) -> list[Path]:
    return [p for i in range(NODES) for p in (fed.work / f"node-{i}").glob("privacy-ledger*")]


@pytest.mark.timeout(1200)
def test_nodes_run_only_apps_signed_with_the_fleet_key(tmp_path: Path) -> None:
    with EmbeddedFederation(tmp_path / "fed", devices=NODES, secure=True,
                            node_config=lambda i: {"privacy-budget": 100.0}) as fed:
        assert fed.app_key is not None
        trust = (fed.work / "app-trust.yaml").read_text()
        assert fed.app_key.key_id in trust and "ssh-ed25519" in trust

        unsigned = _run(fed, tmp_path, "unsigned", None)
        logs = "".join(fed.log_tail(f"node-{i}", 400) for i in range(NODES))
        assert unsigned != "completed", unsigned
        assert "carries no edgefleet signature" in logs
        assert "FAB verification failed" in logs
        assert _ledgers(fed) == []  # no ClientApp trained anything

        foreign = load_or_create(tmp_path / "foreign-key")
        assert foreign.key_id != fed.app_key.key_id
        other = _run(fed, tmp_path, "foreign", foreign)
        logs = "".join(fed.log_tail(f"node-{i}", 400) for i in range(NODES))
        assert other != "completed", other
        assert f"signed by {foreign.key_id}, not a trusted key" in logs
        assert _ledgers(fed) == []

        signed = _run(fed, tmp_path, "signed", fed.app_key)
        assert signed == "completed", signed + "\n" + fed.log_tail("node-0", 60)
        assert len(_ledgers(fed)) >= NODES
    with contextlib.suppress(OSError):
        (tmp_path / "foreign-key" / "app.key").unlink()
