"""Rollouts: who should run which model version, published as retained MQTT assignments.

A canary assigns the candidate to a few devices (``--canary 10%``, ``--devices``) and
watches their health; when the candidate's error + degraded + fallback rate passes the
threshold, or a canary device reports that it rolled back or refused the update, the
canary stops by itself and those devices are assigned their previous version again.
``promote`` makes the candidate the fleet-wide assignment; ``rollback`` undoes the last
promotion or stops a running canary. Every step is an audit-log entry.

Health comes through :class:`~edgefleet.server.rollout.records.HealthSource`, so the same
logic works from the devices' update states
(:class:`~edgefleet.server.rollout.fleet_view.FleetView`) or the telemetry store
(:mod:`edgefleet.server.rollout.health`). :meth:`RolloutController.check` is the one
health check: ``rollout --watch`` and the long-running ``rollout guard``
(:mod:`edgefleet.server.rollout.guard`) both call it on a freshly loaded row. What it must
remember per (rollout, device) lives in ``rollouts.db``
(:class:`~edgefleet.server.rollout.health.RolloutLedger`), so a restarted or second guard
agrees with the first. Stopping claims the row (``running`` -> ``stopping`` ->
``stopped``) with conditional updates, so two guards never stop a canary twice, and a stop
interrupted between the claim and the re-assignments is finished by the next check.

Every assignment goes through the director (:mod:`edgefleet.server.rollout.director`):
one signed message per device on that device's topic, whatever the mode (a group or the
fleet is the set of devices the fleet view knows). Group and fleet topics carry nothing
any more; they are cleared so no stale unsigned message lingers there. A stop or
rollback returns devices to a lower version, so those assignments say ``rollback``
(devices refuse a downgrade without it), and the audit entry names who asked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.wire.updates import (
    FLEET_TOPIC,
    Assignment,
    device_topic,
    group_topic,
    target_path,
    version_key,
)
from edgefleet.server.fleet import director_key
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.rollout.director import Director
from edgefleet.server.rollout.health import RolloutLedger
from edgefleet.server.rollout.records import (
    FleetDirectory,
    HealthRates,
    HealthSource,
    Publisher,
    Rollout,
    RolloutRegistry,
)
from edgefleet.server.rollout.schema import connect

__all__ = ["RolloutController"]

log = logging.getLogger(__name__)


class RolloutController:
    """Starts, watches, promotes and rolls back rollouts of registered model versions."""

    def __init__(self, registry: RolloutRegistry, publisher: Publisher,
                 health: HealthSource | None = None, *, min_inferences: int = 20,
                 director: Director | None = None) -> None:
        self.registry = registry
        self.publisher = publisher
        self.health = health
        self.min_inferences = min_inferences
        self._db = connect(registry.home)
        self.ledger = RolloutLedger(self._db)
        self._director = director
        self._own_director = director is None
        #: The rates each device of a rollout showed at its last check (``guard --json``).
        self.observed: dict[str, dict[str, HealthRates]] = {}

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    # --- the director ------------------------------------------------------------------
    @property
    def director(self) -> Director:
        """The director signing this controller's assignments: its key is loaded on first
        use and again after ``keys rotate director`` (a long-running guard never signs
        with a retired key)."""
        ring = self.registry.keys
        if self._director is None or (self._own_director and self._director.key.keyid
                                      != self._current_keyid(ring)):
            self._director = Director(director_key.load(ring), self._db)
        return self._director

    @staticmethod
    def _current_keyid(ring: KeyRing) -> str | None:
        pub = director_key.public_file(ring.keys_dir)
        return (director_key.director_key_id(director_key.read_public(pub))
                if pub.is_file() else None)

    def _directory(self) -> FleetDirectory | None:
        return self.publisher if isinstance(self.publisher, FleetDirectory) else None

    def _known(self, also: list[str] | None = None) -> list[str]:
        """Every device the fleet view knows, plus ``also``."""
        view = self._directory()
        return sorted(set(view.fleet(0.0) if view else ()) | set(also or ()))

    def _sha(self, model: str, version: str) -> str:
        return self.registry.require(model, version).sha256

    def _assign(self, device: str, model: str, version: str, rollout: str, *,
                shadow: bool = False, rollback: bool = False) -> bool:
        """Sign ``model@version`` for ``device`` and publish it on the device's topic.

        The assignment says ``rollback`` when asked to, and also when ``version`` is below
        what the device reports as the highest it has seen or the director last gave it
        (a promotion after a failed canary); True when it says so (the audit entry lists
        those devices).
        """
        view = self._directory()
        before = [v for v in (view.highest(device, model) if view else None,
                              self._last_version(device, model)) if v]
        down = any(version_key(version) < version_key(v) for v in before)
        a = Assignment(model, version, shadow, rollout, rollback or down,
                       self._sha(model, version))
        payload = self.director.sign(device, a, view.assign_seq(device) if view else None)
        self.publisher.publish(device_topic(device), payload)
        return a.rollback

    def _last_version(self, device: str, model: str) -> str | None:
        last = self.director.assigned(device)
        return last.version if last is not None and last.model == model else None

    def _clear(self, device: str) -> None:
        self.director.clear(device)
        self.publisher.publish(device_topic(device), b"")

    def maintain(self) -> list[str]:
        """What the guard does each pass besides checks; returns the devices signed for.

        Assignments that would expire soon are re-signed, and a device the view knows that
        was never assigned anything gets the fleet-wide version of the newest fleet-wide
        rollout (what a retained fleet message used to give a device that joined later).
        Nothing happens without a director key (a registry made before directors).
        """
        if not self.registry.keys.exists(director_key.DIRECTOR):
            return []
        view = self._directory()
        done = self.director.refresh(self.publisher.publish,
                                     view.assign_seq if view else lambda _d: None)
        if view is None:
            return done
        wide = next((r for r in sorted(self.rollouts(), key=lambda r: -r.updated)
                     if r.status in ("promoted", "rolled_back")), None)
        version = (None if wide is None else wide.version if wide.status == "promoted"
                   else wide.baseline.get("fleet"))
        if wide is None or not version:
            return done
        for d, state_model in view.models().items():
            if state_model in (None, wide.model) and not self.director.known(d):
                self._assign(d, wide.model, version, wide.id,
                             rollback=wide.status == "rolled_back")
                done.append(d)
        return done

    # --- storage ---------------------------------------------------------------------
    def _save(self, r: Rollout) -> None:
        r.updated = time.time()
        self._db.execute(
            "INSERT OR REPLACE INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (r.id, r.model, r.version, r.mode, json.dumps(r.devices), json.dumps(r.baseline),
             r.group, int(r.shadow), r.threshold, r.status, r.reason, r.created, r.updated))

    def _claim(self, rid: str, frm: tuple[str, ...], to: str, **cols: Any) -> bool:
        """Move row ``rid`` from one of ``frm`` to ``to`` atomically; False if another won."""
        sets = ", ".join(f"{k} = ?" for k in ("status", *cols, "updated"))
        marks = ",".join("?" * len(frm))
        cur = self._db.execute(f"UPDATE rollouts SET {sets} WHERE id = ? AND status IN "
                               f"({marks})", (to, *cols.values(), time.time(), rid, *frm))
        return cur.rowcount == 1

    def get(self, rid: str) -> Rollout:
        """The rollout ``rid`` as stored now."""
        row = self._db.execute("SELECT * FROM rollouts WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise UsageError(f"no rollout {rid}")
        return self._load(row)

    def active(self) -> list[Rollout]:
        """Rollouts a guard must look at (running, or a stop to finish); bad rows skipped."""
        out = []
        for row in self._db.execute("SELECT * FROM rollouts WHERE status IN "
                                    "('running', 'stopping') ORDER BY created").fetchall():
            try:
                out.append(self._load(row))
            except (ValueError, TypeError, IndexError) as exc:
                log.error("rollout row %r is unreadable, skipped: %s", row[0], exc)
        return out

    def _load(self, row: tuple[Any, ...]) -> Rollout:
        return Rollout(row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]),
                       row[6], bool(row[7]), float(row[8]), row[9], row[10], row[11], row[12])

    def rollouts(self, model: str | None = None) -> list[Rollout]:
        """Rollouts, newest first."""
        q = "SELECT * FROM rollouts" + (" WHERE model=?" if model else "") + " ORDER BY created"
        return [self._load(r) for r in self._db.execute(q, (model,) if model else ())][::-1]

    def latest(self, model: str, statuses: tuple[str, ...]) -> Rollout | None:
        """The newest rollout of ``model`` in one of ``statuses``."""
        return next((r for r in self.rollouts(model) if r.status in statuses), None)

    # --- operations --------------------------------------------------------------------
    def start(self, model: str, version: str, *, fleet: dict[str, str | None],
              canary_pct: float | None = None, devices: list[str] | None = None,
              group: str | None = None, everyone: bool = False, shadow: bool = False,
              threshold: float = 0.2, actor: str | None = None) -> Rollout:
        """Assign ``model@version`` to a canary, explicit devices, a group or everyone.

        ``fleet`` maps known device ids to the version each runs now (the baseline
        a stopped canary returns to).
        """
        rec = self.registry.require(model, version)
        if rec.yanked:
            raise UsageError(f"{model}@{version} was yanked")
        if sum(x is not None and x is not False for x in (canary_pct, devices, group,
                                                          everyone or None)) != 1:
            raise UsageError("choose exactly one of --canary, --devices, --group, --fleet")
        rid = uuid.uuid4().hex[:12]
        mode, chosen = "canary", list(devices or [])
        if canary_pct is not None:
            if not 0 < canary_pct <= 100:
                raise UsageError("--canary must be a percentage in (0, 100]")
            if not fleet:
                raise UsageError("no devices have reported their update state yet")
            n = max(1, round(len(fleet) * canary_pct / 100))
            order = sorted(fleet, key=lambda d: hashlib.sha256(f"{rid}:{d}".encode()).digest())
            chosen = sorted(order[:n])
        elif group is not None:
            mode = "group"
            view = self._directory()
            chosen = view.members(group) if view else []
            if not chosen:
                raise UsageError(f"no device of group {group!r} has reported its update state")
        elif everyone:
            mode = "fleet"
        r = Rollout(rid, model, version, mode, chosen, {d: fleet.get(d) for d in chosen},
                    group, shadow, threshold, "running")
        targets = chosen
        if mode == "fleet":
            targets = self._known(list(fleet))
            self.publisher.publish(FLEET_TOPIC, b"")  # no unsigned message lingers there
            r.status = "promoted"
        downgraded = [d for d in targets if self._assign(d, model, version, rid, shadow=shadow)]
        self._save(r)
        self.registry.audit.append("rollout.start", actor=actor, rollout=rid, model=model,
                                   version=version, mode=mode, devices=chosen, group=group,
                                   shadow=shadow, threshold=threshold, rollback=downgraded)
        return r

    def check(self, r: Rollout, *, actor: str | None = None) -> Rollout:
        """Stop a running canary whose candidate is unhealthy on any of its devices.

        Callers pass a freshly loaded row (``get``/``active``); a ``stopping`` row is a
        stop someone began and did not finish, and is finished here.
        """
        if r.status == "stopping":
            return self.stop(r, r.reason or "stop interrupted", actor=actor, automatic=True)
        if r.status != "running" or self.health is None or r.shadow:
            return r
        target = target_path(r.model, r.version)
        seen = self.observed.setdefault(r.id, {})
        for d in r.devices:
            h = self.health.health(d, since=r.created, rollout=r.id)
            if h is None:
                continue
            seen[d] = h
            if h.version == r.version:
                self.ledger.saw_candidate(r.id, d)
            left = (h.version != r.version and h.version == r.baseline.get(d)
                    and self.ledger.seen_candidate(r.id, d))
            if h.rolled_back or h.refused == target or left:
                return self.stop(r, f"{d} rolled back or refused {r.version}", actor=actor,
                                 automatic=True)
            if (h.version == r.version and h.inferences >= self.min_inferences
                    and h.bad_rate() > r.threshold):
                return self.stop(r, f"{d}: error/degraded/fallback rate {h.bad_rate():.2f} "
                                 f"> {r.threshold:.2f} over {h.inferences} inferences",
                                 actor=actor, automatic=True)
        return r

    def check_all(self, *, actor: str | None = None) -> list[Rollout]:
        """One guard pass: :meth:`check` every running rollout; a failing one is logged."""
        out = []
        for r in self.active():
            try:
                out.append(self.check(r, actor=actor))
            except (EdgefleetError, OSError, ValueError, KeyError, TypeError) as exc:
                log.error("checking rollout %s of %s@%s failed: %s", r.id, r.model, r.version,
                          exc)
                out.append(r)
        return out

    def watch(self, r: Rollout, seconds: float, interval: float = 0.5) -> Rollout:
        """Check ``r`` every ``interval`` s for ``seconds`` or until it is not running.

        The same check a ``rollout guard`` runs, on the stored row each time, so a guard
        stopping it meanwhile ends the watch (and it is never stopped twice).
        """
        end = time.monotonic() + seconds
        r = self.get(r.id)
        while time.monotonic() < end and r.status in ("running", "stopping"):
            r = self.check(self.get(r.id))
            if r.status == "running":
                time.sleep(interval)
        return r

    def stop(self, r: Rollout, reason: str, *, actor: str | None = None,
             automatic: bool = False) -> Rollout:
        """Return each canary device to its baseline version (or clear its assignment).

        Idempotent: the row is claimed (``running`` -> ``stopping``) before anything is
        published, re-assignments are retained messages (publishing twice is harmless), and
        only whoever moves it ``stopping`` -> ``stopped`` writes the audit entry. A rollout
        another process already stopped or promoted is returned as stored.
        """
        if not self._claim(r.id, ("running",), "stopping", reason=reason):
            current = self.get(r.id)
            if current.status != "stopping":
                return current
            r, reason = current, current.reason or reason
        for d in r.devices:
            base = r.baseline.get(d)
            if base:
                self._assign(d, r.model, base, r.id, rollback=True)
            else:
                self._clear(d)
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        if self._claim(r.id, ("stopping",), "stopped"):
            self.registry.audit.append("rollout.stopped",
                                       actor=actor or ("auto" if automatic else None),
                                       rollout=r.id, model=r.model, version=r.version,
                                       reason=reason, automatic=automatic, rollback=True)
            log.warning("rollout %s of %s@%s stopped: %s", r.id, r.model, r.version, reason)
        return self.get(r.id)

    def promote(self, model: str, *, actor: str | None = None) -> Rollout:
        """Make the running rollout's version the fleet-wide assignment."""
        r = self.latest(model, ("running",))
        if r is None:
            raise UsageError(f"no running rollout of {model} to promote")
        previous = self.latest(model, ("promoted",))
        baseline = {"fleet": previous.version if previous else None}
        # Claimed before publishing: a guard stopping it at the same moment wins or loses
        # as a whole, never half of each.
        if not self._claim(r.id, ("running",), "promoted", baseline=json.dumps(baseline)):
            raise UsageError(f"rollout {r.id} of {model} is {self.get(r.id).status} now")
        # Every device the view knows, and every device an earlier rollout assigned.
        downgraded = [d for d in self._known([d for past in self.rollouts(model)
                                              for d in past.devices])
                      if self._assign(d, model, r.version, r.id)]
        self.publisher.publish(FLEET_TOPIC, b"")
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        r = self.get(r.id)
        self.registry.audit.append("rollout.promote", actor=actor, rollout=r.id, model=model,
                                   version=r.version, rollback=downgraded)
        return r

    def rollback(self, model: str, *, actor: str | None = None) -> Rollout:
        """Stop a running canary, or return the fleet to the version before the last promotion."""
        running = self.latest(model, ("running", "stopping"))
        if running is not None:
            r = self.stop(running, "rolled back by the operator", actor=actor)
            self.registry.audit.append("rollout.rollback", actor=actor, rollout=r.id,
                                       model=model, version=r.version, rollback=True)
            return r
        r2 = self.latest(model, ("promoted",))
        if r2 is None:
            raise UsageError(f"nothing to roll back for {model}")
        before = r2.baseline.get("fleet")
        if not before:
            raise UsageError(f"{model}@{r2.version} has no earlier fleet version to return to")
        for d in self._known([d for past in self.rollouts(model) for d in past.devices]):
            self._assign(d, model, before, r2.id, rollback=True)
        r2.status, r2.reason = "rolled_back", f"fleet returned to {before}"
        self._save(r2)
        self.registry.audit.append("rollout.rollback", actor=actor, rollout=r2.id, model=model,
                                   version=r2.version, to_version=before, rollback=True)
        return r2
