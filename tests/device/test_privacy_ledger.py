"""The privacy ledger: persisted, never decreasing across restarts, refusing past the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.privacy.accounting import DpEvent, epsilon_for
from edgefleet.device.privacy.ledger import (
    LedgerError,
    PrivacyBudgetExceeded,
    PrivacyLedger,
    hwm_path,
    lock_path,
)

EV = DpEvent(q=0.1, sigma=1.0, steps=20)


def test_records_survive_restart_and_spent_never_decreases(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, budget=50.0)
    assert ledger.spent() == 0.0
    seen = []
    for r in range(1, 4):
        seen.append(ledger.record("run-a", r, EV))
        ledger = PrivacyLedger(path, budget=50.0)  # a restart between rounds
        assert ledger.spent() == pytest.approx(seen[-1])
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert ledger.spent() == pytest.approx(epsilon_for([EV] * 3, 1e-5))
    ledger.record("run-b", 1, EV)
    assert PrivacyLedger(path, budget=50.0).spent() > seen[-1]
    assert ledger.run_spent("run-a") == pytest.approx(seen[-1])


def test_refuses_past_budget_and_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    one = epsilon_for([EV], 1e-5)
    ledger = PrivacyLedger(path, budget=one * 1.2)
    ledger.record("r", 1, EV)
    before = default_metrics().counter("fl.declined_budget")
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exhausted"):
        ledger.record("r", 2, EV)
    assert default_metrics().counter("fl.declined_budget") == before + 1
    assert len(PrivacyLedger(path, budget=10.0).entries) == 1


def test_lost_entries_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, budget=50.0)
    ledger.record("r", 1, EV)
    ledger.record("r", 2, EV)
    doc = json.loads(path.read_text())
    doc["entries"] = doc["entries"][:1]  # a rolled-back or truncated ledger
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="entries were lost"):
        PrivacyLedger(path, budget=50.0)


@pytest.mark.parametrize("content", ["", "{not json", '{"schema": 99, "entries": []}',
                                     '{"schema": 1, "entries": [{"bogus": 1}]}'])
def test_unreadable_ledger_refuses_instead_of_resetting(tmp_path: Path, content: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match="refusing"):
        PrivacyLedger(path, budget=50.0)


# -- a ledger that cannot be rolled back (files: .json, .hwm, .lock) -----------------------

def _two_rounds(path: Path) -> PrivacyLedger:
    ledger = PrivacyLedger(path, budget=50.0)
    ledger.record("r", 1, EV)
    ledger.record("r", 2, EV)
    return ledger


def _record_rounds(path: str, rounds: list[int]) -> None:
    """One writer (a thread, or a process as Flower starts per message)."""
    for r in rounds:
        PrivacyLedger(Path(path), budget=1e6).record("run", r, EV)


def test_concurrent_threads_lose_no_entry(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "privacy-ledger.json"
    threads = [threading.Thread(target=_record_rounds, args=(str(path), list(range(w, 40, 4))))
               for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger = PrivacyLedger(path, budget=1e6)
    assert sorted(e.round for e in ledger.entries) == list(range(40))


def test_concurrent_processes_lose_no_entry(tmp_path: Path) -> None:
    import multiprocessing

    path = tmp_path / "privacy-ledger.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_rounds, args=(str(path), list(range(w, 24, 3))))
             for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ledger = PrivacyLedger(path, budget=1e6)
    assert sorted(e.round for e in ledger.entries) == list(range(24))
    assert ledger.spent() == pytest.approx(epsilon_for([EV] * 24, 1e-5))


def test_deleted_ledger_is_refused_not_a_fresh_budget(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    _two_rounds(path)
    path.unlink()
    with pytest.raises(LedgerError, match=r"ledger missing.*deleted"):
        PrivacyLedger(path, budget=50.0)


def test_deleted_high_water_mark_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    _two_rounds(path)
    hwm_path(path).unlink()
    with pytest.raises(LedgerError, match=r"high-water mark .* missing"):
        PrivacyLedger(path, budget=50.0)


def test_deleted_lock_file_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    _two_rounds(path)
    lock_path(path).unlink()
    assert len(PrivacyLedger(path, budget=50.0).entries) == 2


def test_both_deleted_on_an_enrolled_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    assert PrivacyLedger.initialize(path)  # enrollment
    assert not PrivacyLedger.initialize(path)  # idempotent, never a reset
    PrivacyLedger(path, budget=50.0, create=False).record("r", 1, EV)
    path.unlink()
    hwm_path(path).unlink()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger(path, budget=50.0, create=False)


def test_ledger_restored_from_an_older_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path, budget=50.0)
    ledger.record("r", 1, EV)
    old = path.read_bytes()
    ledger.record("r", 2, EV)
    path.write_bytes(old)
    with pytest.raises(LedgerError, match="older copy"):
        PrivacyLedger(path, budget=50.0)
    with pytest.raises(LedgerError):  # a writer with an open ledger re-reads under the lock
        ledger.record("r", 3, EV)


def test_edited_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    _two_rounds(path)
    doc = json.loads(path.read_text())
    doc["entries"][0]["sigma"] = 50.0  # pretend the first round cost almost nothing
    doc["entries"].append(doc["entries"][1])
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="edited"):
        PrivacyLedger(path, budget=50.0)


def test_high_water_mark_restored_from_an_older_copy_stays_consistent(tmp_path: Path) -> None:
    """The mark is a lower bound: an older one still matches the ledger's first entries,
    the ledger keeps every entry (no ε lost), and the next round writes the mark forward."""
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path, budget=50.0)
    ledger.record("r", 1, EV)
    old_mark = hwm_path(path).read_bytes()
    total = ledger.record("r", 2, EV)
    hwm_path(path).write_bytes(old_mark)
    again = PrivacyLedger(path, budget=50.0)
    assert again.spent() == pytest.approx(total)
    again.record("r", 3, EV)
    assert json.loads(hwm_path(path).read_text())["entries"] == 3


def test_both_restored_from_the_same_older_copy_is_the_documented_limit(tmp_path: Path) -> None:
    """A consistent older pair cannot be told apart on the device alone
    (docs/threat-model.md): the ledger accepts it. This test pins that limit."""
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path, budget=50.0)
    ledger.record("r", 1, EV)
    old = path.read_bytes(), hwm_path(path).read_bytes()
    ledger.record("r", 2, EV)
    path.write_bytes(old[0])
    hwm_path(path).write_bytes(old[1])
    assert len(PrivacyLedger(path, budget=50.0).entries) == 1


def test_a_ledger_from_before_the_separate_mark_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "privacy-ledger.json"
    eps = epsilon_for([EV], 1e-5)
    path.write_text(json.dumps({"schema": 1, "delta": 1e-5, "budget": 50.0,
                                "epsilon_high_water": eps, "entries": [
                                    {"run_id": "r", "round": 1, "q": EV.q, "sigma": EV.sigma,
                                     "steps": EV.steps, "at": "2026-01-01T00:00:00+00:00"}]}))
    ledger = PrivacyLedger(path, budget=50.0)
    assert ledger.spent() == pytest.approx(eps)
    ledger.record("r", 2, EV)
    assert json.loads(hwm_path(path).read_text())["entries"] == 2
