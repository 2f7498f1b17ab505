"""Rollouts: who should run which model version, published as retained MQTT assignments.

A canary assigns the candidate to a few devices (``--canary 10%``, ``--devices``) and
watches their health; when the candidate's error + degraded + fallback rate passes the
threshold, or a canary device reports that it rolled back or refused the update, the
canary stops by itself and those devices are assigned their previous version again.
``promote`` makes the candidate the fleet-wide assignment; ``rollback`` undoes the last
promotion or stops a running canary. Every step is an audit-log entry.

Health comes through :class:`HealthSource`, a one-method protocol, so the same logic
works from the devices' update-state messages (:class:`FleetView`) or the telemetry store.
:meth:`RolloutController.check` is the one health check: ``rollout --watch`` and the
long-running ``rollout guard`` (:mod:`edgefleet.server.rollout.guard`) both call it on a
freshly loaded row. What it must remember per (rollout, device) -- the store counters
when the rollout began, whether the device ever ran the candidate -- lives in
``registry.db`` (:class:`RolloutLedger`), so a restarted or second guard agrees with the
first. Stopping claims the row (``running`` -> ``stopping`` -> ``stopped``) with
conditional updates, so two guards never stop a canary twice, and a stop interrupted
between the claim and the re-assignments is finished by the next check.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.wire.updates import (
    ASSIGN_ROOT,
    EVENT_FILTER,
    FLEET_TOPIC,
    STATE_FILTER,
    Assignment,
    device_topic,
    group_topic,
    target_path,
)
from edgefleet.server.registry.repository import Registry
from edgefleet.server.telemetry.store import apply_migrations

__all__ = ["MIGRATIONS", "CombinedHealth", "Counts", "FleetView", "HealthRates",
           "HealthSource", "Rollout", "RolloutController", "RolloutLedger",
           "StoreHealthSource", "migrate"]

log = logging.getLogger(__name__)

#: Numbered schema changes of the rollout tables in ``registry.db``, applied in order in
#: one transaction and recorded in ``rollout_migrations`` (the store's scheme and helper,
#: :func:`~edgefleet.server.telemetry.store.apply_migrations`). Version 1 is the table that existed
#: before migrations, hence ``IF NOT EXISTS``.
MIGRATIONS: list[list[str]] = [
    [  # 1: rollouts
        """CREATE TABLE IF NOT EXISTS rollouts (
            id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL,
            mode TEXT NOT NULL, devices TEXT NOT NULL, baseline TEXT NOT NULL, grp TEXT,
            shadow INTEGER NOT NULL, threshold REAL NOT NULL, status TEXT NOT NULL,
            reason TEXT, created REAL NOT NULL, updated REAL NOT NULL)""",
    ],
    [  # 2: per (rollout, device): store counters at the rollout's start, candidate seen
        """CREATE TABLE rollout_devices (
            rollout TEXT NOT NULL, device TEXT NOT NULL, boot TEXT,
            inferences INTEGER, errors INTEGER, degraded INTEGER, fallback INTEGER,
            recorded REAL, on_candidate REAL, PRIMARY KEY (rollout, device))""",
        "CREATE INDEX rollouts_status ON rollouts (status)",
    ],
]


def migrate(db: sqlite3.Connection) -> int:
    """Apply the rollout migrations ``db`` (autocommit mode) has not seen; returns the version."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = apply_migrations(db.execute, lambda sql: db.execute(sql).fetchone()[0],
                                   "rollout_migrations", MIGRATIONS,
                                   "registry.db has rollout schema")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return version


def connect(path: Path) -> sqlite3.Connection:
    """``registry.db`` in autocommit mode (transactions explicit), migrated."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    migrate(db)
    return db


@dataclass(frozen=True)
class HealthRates:
    """A device's counts for the model it runs, since that model was activated."""

    version: str | None
    inferences: int = 0
    errors: int = 0
    degraded: int = 0
    fallback: int = 0
    rolled_back: bool = False
    #: The target of the device's last refused update (from its retained state), if any.
    refused: str | None = None
    #: False when the source knows the version but has no counts (a state without health).
    measured: bool = True

    def bad_rate(self) -> float:
        """(errors + degraded + fallback) / inferences."""
        return (self.errors + self.degraded + self.fallback) / max(self.inferences, 1)


class HealthSource(Protocol):
    """Where the controller learns how a device is doing."""

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """The device's rates (rollbacks after ``since``, rates for ``rollout``) or None."""


class Publisher(Protocol):
    """Publishes a retained assignment (an empty payload clears it)."""

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish with QoS 1."""


@dataclass
class Rollout:
    """One row of the ``rollouts`` table."""

    id: str
    model: str
    version: str
    mode: str  # canary | group | fleet
    devices: list[str]
    baseline: dict[str, str | None]
    group: str | None
    shadow: bool
    threshold: float
    status: str  # running | stopped | promoted | rolled_back
    reason: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return dict(self.__dict__)


def _assignment(model: str, version: str, rollout: str, shadow: bool = False) -> bytes:
    return Assignment(model, version, shadow, rollout).encode()


class RolloutController:
    """Starts, watches, promotes and rolls back rollouts of registered model versions."""

    def __init__(self, registry: Registry, publisher: Publisher,
                 health: HealthSource | None = None, *, min_inferences: int = 20) -> None:
        self.registry = registry
        self.publisher = publisher
        self.health = health
        self.min_inferences = min_inferences
        self._db = connect(registry.home / "registry.db")
        self.ledger = RolloutLedger(self._db)
        #: The rates each device of a rollout showed at its last check (``guard --json``).
        self.observed: dict[str, dict[str, HealthRates]] = {}

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

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
        elif everyone:
            mode = "fleet"
        r = Rollout(rid, model, version, mode, chosen, {d: fleet.get(d) for d in chosen},
                    group, shadow, threshold, "running")
        payload = _assignment(model, version, rid, shadow)
        if mode == "group" and group:
            self.publisher.publish(group_topic(group), payload)
        elif mode == "fleet":
            self.publisher.publish(FLEET_TOPIC, payload)
            r.status = "promoted"
        for d in chosen:
            self.publisher.publish(device_topic(d), payload)
        self._save(r)
        self.registry.audit.append("rollout.start", actor=actor, rollout=rid, model=model,
                                   version=version, mode=mode, devices=chosen, group=group,
                                   shadow=shadow, threshold=threshold)
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
            self.publisher.publish(device_topic(d),
                                   _assignment(r.model, base, r.id) if base else b"")
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        if self._claim(r.id, ("stopping",), "stopped"):
            self.registry.audit.append("rollout.stopped",
                                       actor=actor or ("auto" if automatic else None),
                                       rollout=r.id, model=r.model, version=r.version,
                                       reason=reason, automatic=automatic)
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
        self.publisher.publish(FLEET_TOPIC, _assignment(model, r.version, r.id))
        # Device-specific assignments of earlier canaries would override the fleet one.
        for d in sorted({d for past in self.rollouts(model) for d in past.devices}):
            self.publisher.publish(device_topic(d), b"")
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        r = self.get(r.id)
        self.registry.audit.append("rollout.promote", actor=actor, rollout=r.id, model=model,
                                   version=r.version)
        return r

    def rollback(self, model: str, *, actor: str | None = None) -> Rollout:
        """Stop a running canary, or return the fleet to the version before the last promotion."""
        running = self.latest(model, ("running", "stopping"))
        if running is not None:
            r = self.stop(running, "rolled back by the operator", actor=actor)
            self.registry.audit.append("rollout.rollback", actor=actor, rollout=r.id,
                                       model=model, version=r.version)
            return r
        r2 = self.latest(model, ("promoted",))
        if r2 is None:
            raise UsageError(f"nothing to roll back for {model}")
        before = r2.baseline.get("fleet")
        if not before:
            raise UsageError(f"{model}@{r2.version} has no earlier fleet version to return to")
        self.publisher.publish(FLEET_TOPIC, _assignment(model, before, r2.id))
        r2.status, r2.reason = "rolled_back", f"fleet returned to {before}"
        self._save(r2)
        self.registry.audit.append("rollout.rollback", actor=actor, rollout=r2.id, model=model,
                                   version=r2.version, to_version=before)
        return r2


class FleetView:
    """An MQTT client that sees device update states and events and publishes assignments."""

    def __init__(self, host: str, port: int, client_id: str | None = None, *,
                 username: str | None = None, password: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.states: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"rollout-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        if username:
            self.client.username_pw_set(username, password)
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise EdgefleetError(f"cannot reach the MQTT broker at {host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(10):
            raise EdgefleetError(f"the MQTT broker at {host}:{port} did not accept the "
                                 "connection (credentials? EDGEFLEET_MQTT_USERNAME/PASSWORD)")

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, rc: Any, _props: Any) -> None:
        if getattr(rc, "is_failure", False):
            return
        client.subscribe(STATE_FILTER, qos=1)
        client.subscribe(EVENT_FILTER, qos=1)
        self._connected.set()

    def _on_disconnect(self, *_args: Any) -> None:
        self._connected.clear()

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now (paho reconnects in the background)."""
        return self._connected.is_set()

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        device = msg.topic.rsplit("/", 1)[-1]
        with self._lock:
            if "/state/" in msg.topic:
                self.states[device] = body
            else:
                self.events.append(body)

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish QoS 1 and wait until the broker has it."""
        if not topic.startswith(ASSIGN_ROOT):
            raise UsageError(f"refusing to publish outside {ASSIGN_ROOT}: {topic}")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError) as exc:
            raise EdgefleetError(f"publishing {topic} failed: {exc}") from None
        if not info.is_published():
            raise EdgefleetError(f"the broker did not acknowledge {topic} within 10 s")

    def fleet(self, settle_s: float = 1.0) -> dict[str, str | None]:
        """Known devices and the version each runs (waits ``settle_s`` for retained states)."""
        time.sleep(settle_s)
        with self._lock:
            return {d: s.get("version") for d, s in self.states.items()}

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """Rates from the device's last state message, and its rollback/refusal events.

        Events are not retained, so a watcher that connects later learns of a refusal from
        the state's ``last`` outcome instead (``refused``).
        """
        with self._lock:
            state = self.states.get(device)
            bad = any(e.get("device") == device and e.get("event") in ("rolled_back", "rejected")
                      and _num(e.get("ts")) >= since for e in self.events)
        if state is None:
            return None
        h, last = _obj(state.get("health")), _obj(state.get("last"))
        refused = last.get("target") if last.get("outcome") == "rejected" else None
        return HealthRates(state.get("version"), int(_num(h.get("inferences"))),
                           int(_num(h.get("errors"))), int(_num(h.get("degraded"))),
                           int(_num(h.get("fallback"))), rolled_back=bad,
                           refused=refused if isinstance(refused, str) else None,
                           measured=isinstance(state.get("health"), dict))

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


def _obj(value: Any) -> dict[str, Any]:
    """A JSON object from a device's message, {} when it is anything else."""
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float:
    """A number from a device's JSON, 0 when missing or not a number (never raises)."""
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


@dataclass(frozen=True)
class Counts:
    """A device's cumulative store counters within one agent boot."""

    boot: str | None
    inferences: int = 0
    errors: int = 0
    degraded: int = 0
    fallback: int = 0

    @staticmethod
    def from_body(boot: str | None, body: dict[str, Any]) -> Counts:
        """From a telemetry ``metrics`` body (the stored ``last_metrics`` or a message)."""
        counters = _obj(body.get("counters"))
        return Counts(boot, int(_num(body.get("inferences"))),
                      int(_num(counters.get("inference_errors"))),
                      int(_num(body.get("degraded"))), int(_num(body.get("fallback"))))


class RolloutLedger:
    """What a health check remembers per (rollout, device), in ``registry.db``.

    The first writer of a baseline wins (``INSERT ... DO NOTHING``, then read back), so two
    guards that start at once still agree. Without a connection it keeps the same records
    in memory (one process, e.g. a unit test).
    """

    def __init__(self, db: sqlite3.Connection | None = None) -> None:
        self._db = db
        self._mem: dict[tuple[str, str], tuple[Counts | None, bool]] = {}

    def baseline(self, rollout: str, device: str) -> Counts | None:
        """The stored counters this rollout measures the device from, if recorded."""
        if self._db is None:
            return self._mem.get((rollout, device), (None, False))[0]
        row = self._db.execute("SELECT boot, inferences, errors, degraded, fallback, recorded "
                               "FROM rollout_devices WHERE rollout = ? AND device = ?",
                               (rollout, device)).fetchone()
        if row is None or row[5] is None:
            return None
        return Counts(row[0], *(int(x) for x in row[1:5]))

    def set_baseline(self, rollout: str, device: str, c: Counts, *,
                     replace: bool = False) -> Counts:
        """Record ``c`` unless a baseline exists (``replace``: the device rebooted)."""
        if self._db is None:
            old, seen = self._mem.get((rollout, device), (None, False))
            if old is None or replace:
                self._mem[(rollout, device)] = (c, seen)
            return self._mem[(rollout, device)][0] or c
        vals = (c.boot, c.inferences, c.errors, c.degraded, c.fallback, time.time())
        self._db.execute("INSERT INTO rollout_devices (rollout, device) VALUES (?, ?) "
                         "ON CONFLICT (rollout, device) DO NOTHING", (rollout, device))
        self._db.execute("UPDATE rollout_devices SET boot = ?, inferences = ?, errors = ?, "
                         "degraded = ?, fallback = ?, recorded = ? WHERE rollout = ? AND "
                         "device = ?" + ("" if replace else " AND recorded IS NULL"),
                         (*vals, rollout, device))
        return self.baseline(rollout, device) or c

    def saw_candidate(self, rollout: str, device: str) -> None:
        """Note that the device ran the candidate (leaving it later is a rollback)."""
        if self._db is None:
            base, _ = self._mem.get((rollout, device), (None, False))
            self._mem[(rollout, device)] = (base, True)
            return
        self._db.execute("INSERT INTO rollout_devices (rollout, device, on_candidate) "
                         "VALUES (?, ?, ?) ON CONFLICT (rollout, device) DO UPDATE SET "
                         "on_candidate = COALESCE(rollout_devices.on_candidate, "
                         "excluded.on_candidate)", (rollout, device, time.time()))

    def seen_candidate(self, rollout: str, device: str) -> bool:
        """Whether the device was ever seen running the candidate."""
        if self._db is None:
            return self._mem.get((rollout, device), (None, False))[1]
        row = self._db.execute("SELECT on_candidate FROM rollout_devices WHERE rollout = ? "
                               "AND device = ?", (rollout, device)).fetchone()
        return row is not None and row[0] is not None


class StoreHealthSource:
    """Health from the telemetry store (``edgefleet ingest``): counter deltas since a baseline.

    The store keeps cumulative counts per device and agent boot. A rollout's baseline for a
    device is its newest stored ``metrics`` report from before the rollout began (else the
    counts when first asked), recorded once in the :class:`RolloutLedger`; so rates cover
    what happened since the rollout began, whoever asks and however often they restart.
    A device that rebooted since (new boot id, counters from zero) is measured from zero.
    """

    def __init__(self, store: Any, ledger: RolloutLedger | None = None) -> None:
        self.store = store
        self.ledger = ledger or RolloutLedger()

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """Rates of ``device`` from its newest stored metrics report."""
        row = self.store.device(device)
        if row is None:
            return None
        body = _obj(row.get("last_metrics"))
        newest = self._report(device, None)
        now = replace(Counts.from_body(newest[0] if newest else None, body),
                      inferences=int(row.get("n_inferences") or 0),
                      degraded=int(row.get("n_degraded") or 0),
                      fallback=int(row.get("n_fallback") or 0))
        key = rollout or ""
        base = self.ledger.baseline(key, device)
        if base is None:
            base = self.ledger.set_baseline(key, device, self._at_start(device, since, now))
        elif None not in (base.boot, now.boot) and base.boot != now.boot:
            base = self.ledger.set_baseline(key, device, Counts(now.boot), replace=True)
        d = [max(0, a - b) for a, b in zip(
            (now.inferences, now.errors, now.degraded, now.fallback),
            (base.inferences, base.errors, base.degraded, base.fallback), strict=True)]
        return HealthRates(row.get("model_version"), d[0], d[1], d[2], d[3])

    def _report(self, device: str, before: float | None) -> tuple[str, Counts] | None:
        """(boot, counters) of the newest stored metrics message (at or before ``before``)."""
        find = getattr(self.store, "last_metrics_message", None)
        msg = find(device, before) if find is not None else None
        if msg is None:
            return None
        try:
            body = json.loads(msg["payload"]).get("body")
            return str(msg["boot"]), Counts.from_body(str(msg["boot"]), body
                                                      if isinstance(body, dict) else {})
        except (ValueError, AttributeError):
            return None

    def _at_start(self, device: str, since: float, now: Counts) -> Counts:
        """The device's counters when the rollout began, from the stored reports."""
        at = self._report(device, since) if since else None
        if at is None:
            return now  # nothing stored from before: count from now
        if now.boot is not None and at[0] != now.boot:
            return Counts(now.boot)  # rebooted after the rollout began: counting from zero
        return at[1]


class CombinedHealth:
    """Update-state health (rollbacks, refusals) and, where it is silent, the store's counters."""

    def __init__(self, view: HealthSource, store_health: HealthSource) -> None:
        self.view, self.store_health = view, store_health

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """The view's rates; the store's where the view has none (keeping its rollbacks)."""
        v = self.view.health(device, since, rollout)
        if v is not None and v.measured:
            return v
        s = self.store_health.health(device, since, rollout)
        if s is None or v is None:
            return v or s
        return replace(s, version=v.version or s.version, rolled_back=v.rolled_back,
                       refused=v.refused)
