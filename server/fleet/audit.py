"""An append-only, hash-chained audit log of registry, rollout, promotion and rollback events.

Each line is one JSON entry holding the sha256 of the previous entry, so editing or
deleting any entry breaks every hash after it. The head (last sequence number and
hash) is also kept in a separate file, which catches removal of the newest entries.
This detects tampering by someone who edits the log; it cannot stop someone who can
rewrite both the log and the head: ship the head elsewhere (e.g. to a log server) for that.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import atomic_write_json, read_json
from edgefleet.device.core.errors import EdgefleetError

__all__ = ["AuditLog", "AuditReport", "AuditTampered", "audit_details"]

GENESIS = "0" * 64
_EXTRA: ContextVar[tuple[tuple[str, Any], ...]] = ContextVar("edgefleet_audit_extra",
                                                            default=())


@contextmanager
def audit_details(**details: Any) -> Iterator[None]:
    """Add ``details`` to every entry appended inside (in this thread or task).

    The dashboard records the client address of an action this way: the entries are
    written deep inside the calls the CLI shares (alerts, approvals, the rollout
    controller), which know nothing of HTTP.
    """
    token = _EXTRA.set((*_EXTRA.get(), *details.items()))
    try:
        yield
    finally:
        _EXTRA.reset(token)


class AuditTampered(EdgefleetError):
    """The audit log does not verify: an entry was edited, removed or reordered."""

    exit_code = 66

    def __init__(self, message: str, *, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True)
class AuditReport:
    """A verified log: how many entries and the hash of the last one."""

    entries: int
    head: str


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


class AuditLog:
    """``audit.jsonl`` plus ``audit.head.json`` in one folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.stem + ".head.json")

    def append(self, action: str, *, actor: str | None = None, **details: Any) -> dict[str, Any]:
        """Add one entry (under an exclusive lock, fsynced) and return it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            head = read_json(self.head_path) or {"seq": 0, "hash": GENESIS}
            entry: dict[str, Any] = {
                "seq": int(head["seq"]) + 1,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "actor": actor or os.environ.get("USER", "unknown"),
                "action": action,
                "details": {**dict(_EXTRA.get()), **details},
                "prev": head["hash"],
            }
            entry["hash"] = _entry_hash(entry)
            fh.write((json.dumps(entry, sort_keys=True) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
            atomic_write_json(self.head_path, {"seq": entry["seq"], "hash": entry["hash"]})
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every entry as written (unverified)."""
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AuditTampered(f"line {n} is not JSON", seq=n) from None
        return out

    def verify(self) -> AuditReport:
        """Check the whole chain and the head; raise :class:`AuditTampered` on any break."""
        prev, seq = GENESIS, 0
        for entry in self.entries():
            seq += 1
            if not isinstance(entry, dict) or entry.get("seq") != seq:
                raise AuditTampered(f"entry {seq} is missing or out of order (an entry was "
                                    "removed or reordered)", seq=seq)
            if entry.get("prev") != prev:
                raise AuditTampered(f"entry {seq} does not follow entry {seq - 1} "
                                    "(an entry was removed or replaced)", seq=seq)
            if entry.get("hash") != _entry_hash(entry):
                raise AuditTampered(f"entry {seq} was edited (hash mismatch)", seq=seq)
            prev = entry["hash"]
        head = read_json(self.head_path) or {"seq": 0, "hash": GENESIS}
        if head.get("seq") != seq or head.get("hash") != prev:
            raise AuditTampered(f"log ends at entry {seq} but the head says {head.get('seq')} "
                                "(entries were removed from the end)", seq=seq)
        return AuditReport(entries=seq, head=prev)
