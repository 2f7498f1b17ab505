"""The privacy ledger: persisted, never decreasing across restarts, refusing past the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.privacy.accounting import DpEvent, epsilon_for
from edgefleet.device.privacy.ledger import LedgerError, PrivacyBudgetExceeded, PrivacyLedger

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
