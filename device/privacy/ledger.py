"""The device's privacy ledger: every DP release it ever made, persisted, never forgotten.

ε is a property of everything a device released about its records, across all rounds
and all runs, so the ledger is per device and outlives processes: each round's
:class:`~edgefleet.device.privacy.accounting.DpEvent` is appended with a crash-safe write
*before* the update leaves the device. Total ε is recomputed from the events (RDP
composition at the ledger's δ).

Three files in the node's state folder, so that no single file can reset the budget:

``privacy-ledger.json``
    the entries (the truth ε is computed from).
``privacy-ledger.hwm``
    the high-water mark: how many entries the ledger has held, the ε they reached and
    a SHA-256 of those entries. Written (fsynced, atomically) right after the ledger
    and before the update is released. The ledger may be *ahead* of it (a crash between
    the two writes), never behind: fewer entries, a lower ε, or entries whose digest no
    longer matches mean the ledger was deleted, truncated, edited or restored from an
    older copy, and training is refused.
``privacy-ledger.lock``
    an ``fcntl.flock`` lock held around every read-check-write, so two ClientApps
    (threads or processes: Flower starts one process per message) never lose an entry.

Missing files: neither file is a fresh device (a ledger created with ``create=False``,
as an enrolled agent's SuperNode runs it, refuses even that: the agent created both at
enrollment). A high-water mark without a ledger is a deleted ledger (refused); a ledger
with entries but no high-water mark is a deleted mark (refused). A high-water mark
restored from an older copy is harmless: it is a lower bound, the ledger still holds
every entry and the next round writes it forward. Restoring *both* files from the same
older copy is not detectable on the device alone (docs/threat-model.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import atomic_write_json
from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.privacy.accounting import DpEvent, epsilon_for

__all__ = ["LEDGER_FILE", "LedgerEntry", "LedgerError", "PrivacyBudgetExceeded", "PrivacyLedger",
           "RunBudgetExceeded", "hwm_path", "lock_path"]

log = logging.getLogger(__name__)
SCHEMA = 1
HWM_SCHEMA = 1
#: The ledger's file name in a node's state folder (``.hwm`` and ``.lock`` beside it).
LEDGER_FILE = "privacy-ledger.json"


class LedgerError(EdgefleetError):
    """The ledger is missing, unreadable or rolled back; training is refused until fixed."""

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


class RunBudgetExceeded(EdgefleetError):
    """This round would take one run past the most ε the device lets a run spend."""

    exit_code = 75

    def __init__(self, run_id: str, projected: float, limit: float, delta: float) -> None:
        super().__init__(
            f"privacy policy: run {run_id} would reach ε={projected:.3f} > the device's "
            f"per-run maximum ε={limit:.3f} at δ={delta:g}")
        self.projected = projected
        self.limit = limit


@dataclass(frozen=True)
class LedgerEntry:
    """One release (a round of local DP-SGD, or a noised evaluation) that left the device."""

    run_id: str
    round: int
    q: float
    sigma: float
    steps: int
    at: str
    kind: str = "train"

    @property
    def event(self) -> DpEvent:
        """The accountant's view of this entry."""
        return DpEvent(self.q, self.sigma, self.steps)


def hwm_path(path: Path) -> Path:
    """The high-water-mark file next to ledger ``path``."""
    return path.with_suffix(".hwm")


def lock_path(path: Path) -> Path:
    """The lock file next to ledger ``path``."""
    return path.with_suffix(".lock")


def _digest(entries: list[LedgerEntry]) -> str:
    doc = json.dumps([asdict(e) for e in entries], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()


class PrivacyLedger:
    """Append-only record of DP events with a separate high-water mark, at a fixed δ.

    ``create=False``: both files must already exist (an enrolled device: the agent
    created them at enrollment), so deleting both is refused rather than a fresh budget.
    """

    def __init__(self, path: Path, budget: float, delta: float = 1e-5, *,
                 create: bool = True) -> None:
        self.path = path
        self.hwm = hwm_path(path)
        self.budget = float(budget)
        self.delta = float(delta)
        self.create = create
        self._tlock = threading.Lock()
        self._entries: list[LedgerEntry] = []
        self._legacy_high: float | None = None
        with self._locked():
            self._entries = self._load()

    @classmethod
    def initialize(cls, path: Path) -> bool:
        """Create an empty ledger and its high-water mark if neither exists (enrollment).

        Returns True when created. Existing files are left alone (and checked).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path, budget=float("inf"), create=True)
        with ledger._locked():
            if path.exists() or ledger.hwm.exists():
                ledger._load()
                return False
            ledger._write([])
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Thread lock, then an exclusive ``flock`` on the lock file (other processes)."""
        with self._tlock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _refuse(self, counter: str, why: str) -> LedgerError:
        default_metrics().inc(counter)
        return LedgerError(f"{self.path}: {why}; refusing to train rather than restart the "
                           "budget at zero")

    def _read_entries(self) -> list[LedgerEntry] | None:
        self._legacy_high = None
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            if data.get("schema") != SCHEMA:
                raise ValueError(f"unknown schema {data.get('schema')!r}")
            self._legacy_high = data.get("epsilon_high_water")
            return [LedgerEntry(**e) for e in data["entries"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._refuse("fl.ledger_unreadable",
                               f"privacy ledger unreadable ({exc})") from None

    def _read_hwm(self) -> dict[str, Any] | None:
        if not self.hwm.exists():
            return None
        try:
            doc = json.loads(self.hwm.read_text())
            if doc.get("schema") != HWM_SCHEMA:
                raise ValueError(f"unknown schema {doc.get('schema')!r}")
            out = {"entries": int(doc["entries"]), "epsilon": float(doc["epsilon"]),
                   "sha256": str(doc["sha256"])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._refuse("fl.ledger_unreadable",
                               f"high-water mark {self.hwm.name} unreadable ({exc})") from None
        return out

    def _load(self) -> list[LedgerEntry]:
        """Read both files and check the ledger against the high-water mark."""
        entries = self._read_entries()
        mark = self._read_hwm()
        if entries is None and mark is None:
            if not self.create:
                raise self._refuse("fl.ledger_missing", "privacy ledger and its high-water mark "
                                   "are missing (both were created at enrollment)")
            return []
        if entries is None:
            raise self._refuse("fl.ledger_missing", f"privacy ledger missing but "
                               f"{self.hwm.name} records {mark['entries'] if mark else 0} "
                               "entries: it was deleted")
        if mark is None and self._legacy_high is not None:
            # A ledger written before the high-water mark moved to its own file: its
            # in-file mark still guards it; the next record writes the separate mark.
            mark = {"entries": 0, "epsilon": float(self._legacy_high), "sha256": _digest([])}
        if mark is None:
            if entries:
                raise self._refuse("fl.ledger_missing", f"high-water mark {self.hwm.name} "
                                   f"missing for a ledger of {len(entries)} entries: it was "
                                   "deleted")
            return entries
        n = mark["entries"]
        if len(entries) < n:
            raise self._refuse("fl.ledger_shrunk", f"ledger holds {len(entries)} entries but "
                               f"{n} were recorded before: entries were lost or the ledger "
                               "was restored from an older copy")
        if _digest(entries[:n]) != mark["sha256"]:
            raise self._refuse("fl.ledger_shrunk", f"the first {n} ledger entries differ from "
                               "what the high-water mark recorded: the ledger was edited")
        spent = epsilon_for([e.event for e in entries], self.delta) if entries else 0.0
        if spent + 1e-9 < mark["epsilon"]:
            raise self._refuse("fl.ledger_shrunk", f"ledger accounts ε={spent:.4f} but "
                               f"ε={mark['epsilon']:.4f} was recorded before")
        return entries

    def _write(self, entries: list[LedgerEntry]) -> float:
        """Ledger first, then the high-water mark (a crash between leaves the mark behind,
        which is allowed; the other order would leave it ahead, which is refused)."""
        total = epsilon_for([e.event for e in entries], self.delta) if entries else 0.0
        atomic_write_json(self.path, {"schema": SCHEMA, "delta": self.delta,
                                      "budget": self.budget if self.budget < float("inf")
                                      else None,
                                      "entries": [asdict(e) for e in entries]})
        atomic_write_json(self.hwm, {"schema": HWM_SCHEMA, "entries": len(entries),
                                     "epsilon": total, "sha256": _digest(entries)})
        return total

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

    def record(self, run_id: str, server_round: int, event: DpEvent, *,
               run_limit: float | None = None, kind: str = "train") -> float:
        """Check, append and persist ``event`` (durably) before its result is released.

        Under the lock the files are read again (another process may have appended), the
        lifetime budget and, with ``run_limit``, the run's own ε are checked, then both
        files are written. Returns the new total ε.
        """
        with self._locked():
            self._entries = self._load()
            self.check(event)
            if run_limit is not None:
                run_events = [e.event for e in self._entries if e.run_id == run_id]
                projected = epsilon_for([*run_events, event], self.delta)
                if projected > run_limit:
                    default_metrics().inc("fl.declined_policy")
                    raise RunBudgetExceeded(run_id, projected, run_limit, self.delta)
            entry = LedgerEntry(run_id=run_id, round=server_round, q=event.q,
                                sigma=event.sigma, steps=event.steps, kind=kind,
                                at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
            entries = [*self._entries, entry]
            total = self._write(entries)
            self._entries = entries
            log.info("privacy ledger: run %s round %d (%s), total ε=%.4f of %.4f", run_id,
                     server_round, kind, total, self.budget)
            return total
