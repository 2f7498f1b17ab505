"""The director: signs, per device, which model version it should run (Uptane's director).

Every assignment the rollout controller publishes goes through :meth:`Director.sign`:
an Ed25519 signature (the director key, :mod:`edgefleet.server.fleet.director_key`) over
the device id, model, version, sha256 (which the device compares with TUF's), shadow and
rollback flags, a sequence number and an expiry
(:func:`~edgefleet.device.wire.updates.sign_assignment`).

The sequence number is above both the last one this director signed for the device
(``director_assignments`` in ``rollouts.db``) and the last one the device reports having
taken (``assign_seq`` in its update state), so a director that lost its database still
signs something the device takes, and a device never takes an older assignment again.
Assignments expire (:data:`DEFAULT_TTL_S`); :meth:`Director.refresh` re-signs the ones past
half their life, which the rollout guard does on every pass.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict

from edgefleet.device.wire.updates import Assignment, device_topic, sign_assignment
from edgefleet.server.fleet.director_key import DirectorKey

__all__ = ["DEFAULT_TTL_S", "Director"]

log = logging.getLogger(__name__)

#: How long a signed assignment is valid (a device offline longer needs a re-signed one).
DEFAULT_TTL_S = 7 * 24 * 3600.0


def _dump(a: Assignment) -> str:
    return json.dumps(asdict(a))


def _load(text: str) -> Assignment:
    return Assignment(**json.loads(text))


class Director:
    """Signs assignments with ``key``, keeping each device's last seq in ``db``."""

    def __init__(self, key: DirectorKey, db: sqlite3.Connection, *,
                 ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.db = db
        self.ttl_s = ttl_s
        self.clock = clock

    def _last_seq(self, device: str) -> int:
        row = self.db.execute("SELECT seq FROM director_assignments WHERE device = ?",
                              (device,)).fetchone()
        return int(row[0]) if row else 0

    def sign(self, device: str, a: Assignment, reported_seq: int | None = None) -> bytes:
        """The payload of ``a`` for ``device``; ``reported_seq``: the last seq it took."""
        now = self.clock()
        expires = int(now + self.ttl_s)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seq = max(self._last_seq(device), reported_seq or 0) + 1
            self.db.execute("INSERT OR REPLACE INTO director_assignments VALUES (?,?,?,?,?)",
                            (device, seq, _dump(a), expires, now))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return sign_assignment(a, device=device, seq=seq, expires=expires,
                               key=self.key.private, chain=self.key.chain)

    def clear(self, device: str) -> None:
        """The device has no assignment now (its seq floor is kept)."""
        self.db.execute("UPDATE director_assignments SET assignment = NULL WHERE device = ?",
                        (device,))

    def known(self, device: str) -> bool:
        """Whether this director ever signed (or cleared) an assignment for ``device``."""
        return self.db.execute("SELECT 1 FROM director_assignments WHERE device = ?",
                               (device,)).fetchone() is not None

    def assigned(self, device: str) -> Assignment | None:
        """What the director last signed for ``device`` (None: nothing, or cleared)."""
        row = self.db.execute("SELECT assignment FROM director_assignments WHERE device = ?",
                              (device,)).fetchone()
        return _load(row[0]) if row and row[0] else None

    def refresh(self, publish: Callable[[str, bytes], None],
                reported: Callable[[str], int | None]) -> list[str]:
        """Re-sign and publish every assignment past half its life; returns the devices."""
        due = self.clock() + self.ttl_s / 2
        rows = self.db.execute("SELECT device, assignment FROM director_assignments WHERE "
                               "assignment IS NOT NULL AND expires < ?", (due,)).fetchall()
        done = []
        for device, text in rows:
            publish(device_topic(device), self.sign(device, _load(text), reported(device)))
            done.append(str(device))
        if done:
            log.info("re-signed the assignments of %d devices before they expire", len(done))
        return done
