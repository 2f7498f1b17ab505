"""The device's privacy ledger: every DP-SGD step it ever took, persisted, never forgotten.

ε is a property of everything a device released about its records, across all rounds
and all runs, so the ledger is per device and outlives processes: each round's
:class:`~edgefleet.device.privacy.accounting.DpEvent` is
appended with a crash-safe write *before* the
update leaves the device. Total ε is recomputed from the events (RDP composition at the
ledger's δ), and a high-water mark guards against a ledger that shrank (a lost or
rolled-back file would otherwise reset the budget): such a ledger refuses to train.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import atomic_write_json
from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.privacy.accounting import DpEvent, epsilon_for

__all__ = ["LedgerEntry", "LedgerError", "PrivacyBudgetExceeded", "PrivacyLedger"]

log = logging.getLogger(__name__)
SCHEMA = 1


class LedgerError(EdgefleetError):
    """The ledger file is unreadable or inconsistent; training is refused until fixed."""

    exit_code = 65


class PrivacyBudgetExceeded(EdgefleetError):
    """Training would take the device past its privacy budget."""

    exit_code = 75

    def __init__(self, spent: float, projected: float, budget: float, delta: float) -> None:
        super().__init__(
            f"privacy budget exhausted: spent ε={spent:.3f}, this round would reach "
            f"ε={projected:.3f} > budget ε={budget:.3f} at δ={delta:g}")
        self.spent = spent
        self.projected = projected
        self.budget = budget


@dataclass(frozen=True)
class LedgerEntry:
    """One round of local DP-SGD that left the device."""

    run_id: str
    round: int
    q: float
    sigma: float
    steps: int
    at: str

    @property
    def event(self) -> DpEvent:
        """The accountant's view of this entry."""
        return DpEvent(self.q, self.sigma, self.steps)


class PrivacyLedger:
    """Append-only record of DP events in a JSON file, with a budget at a fixed δ."""

    def __init__(self, path: Path, budget: float, delta: float = 1e-5) -> None:
        self.path = path
        self.budget = float(budget)
        self.delta = float(delta)
        self._lock = threading.Lock()
        self._entries: list[LedgerEntry] = []
        self._high_water = 0.0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {data.get('schema')!r}")
            entries = [LedgerEntry(**e) for e in data["entries"]]
            high = float(data.get("epsilon_high_water", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            default_metrics().inc("fl.ledger_unreadable")
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc}); refusing to "
                              "train rather than restart the budget at zero") from None
        self._entries = entries
        self._high_water = high
        if self.spent() + 1e-9 < high:
            default_metrics().inc("fl.ledger_shrunk")
            raise LedgerError(f"{self.path}: ledger accounts ε={self.spent():.4f} but ε={high:.4f}"
                              " was recorded before; entries were lost, refusing to train")

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """Everything recorded so far, oldest first."""
        return tuple(self._entries)

    def spent(self) -> float:
        """Total ε at the ledger's δ over every recorded event."""
        return epsilon_for([e.event for e in self._entries], self.delta) if self._entries else 0.0

    def run_spent(self, run_id: str, delta: float | None = None) -> float:
        """ε of one run's events alone (what that run's model reveals about this device)."""
        events = [e.event for e in self._entries if e.run_id == run_id]
        return epsilon_for(events, delta or self.delta) if events else 0.0

    def check(self, event: DpEvent) -> float:
        """Projected total ε if ``event`` were spent; raises when that passes the budget."""
        projected = epsilon_for([*(e.event for e in self._entries), event], self.delta)
        if projected > self.budget:
            default_metrics().inc("fl.declined_budget")
            raise PrivacyBudgetExceeded(self.spent(), projected, self.budget, self.delta)
        return projected

    def record(self, run_id: str, server_round: int, event: DpEvent) -> float:
        """Check, append and persist ``event`` (durably) before its result is released."""
        with self._lock:
            self.check(event)
            entry = LedgerEntry(run_id=run_id, round=server_round, q=event.q,
                                sigma=event.sigma, steps=event.steps,
                                at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            entries = [*self._entries, entry]
            total = epsilon_for([e.event for e in entries], self.delta)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, self._document(entries, max(total, self._high_water)))
            self._entries = entries
            self._high_water = max(total, self._high_water)
            log.info("privacy ledger: run %s round %d, total ε=%.4f of %.4f", run_id,
                     server_round, total, self.budget)
            return total

    def _document(self, entries: list[LedgerEntry], high: float) -> dict[str, Any]:
        return {"schema": SCHEMA, "delta": self.delta, "budget": self.budget,
                "epsilon_high_water": high, "entries": [asdict(e) for e in entries]}
