"""Rollouts: who should run which model version, published as retained MQTT assignments.

A canary assigns the candidate to a few devices (``--canary 10%``, ``--devices``) and
watches their health; when the candidate's error + degraded + fallback rate passes the
threshold, or a canary device reports that it rolled back or refused the update, the
canary stops by itself and those devices are assigned their previous version again.
``promote`` makes the candidate the fleet-wide assignment; ``rollback`` undoes the last
promotion or stops a running canary. Every step is an audit-log entry.

Health comes through :class:`HealthSource`, a one-method protocol, so the same logic
works from the devices' update-state messages (:class:`FleetView`) or the telemetry store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgefleet.device.errors import EdgefleetError, UsageError
from edgefleet.device.update_agent import (
    ASSIGN_ROOT,
    FLEET_TOPIC,
    device_topic,
    group_topic,
)
from edgefleet.server.registry import Registry

__all__ = ["FleetView", "HealthRates", "HealthSource", "Rollout", "RolloutController",
           "StoreHealthSource"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version TEXT NOT NULL, mode TEXT NOT NULL,
    devices TEXT NOT NULL, baseline TEXT NOT NULL, grp TEXT, shadow INTEGER NOT NULL,
    threshold REAL NOT NULL, status TEXT NOT NULL, reason TEXT,
    created REAL NOT NULL, updated REAL NOT NULL
);
"""


@dataclass(frozen=True)
class HealthRates:
    """A device's counts for the model it runs, since that model was activated."""

    version: str | None
    inferences: int = 0
    errors: int = 0
    degraded: int = 0
    fallback: int = 0
    rolled_back: bool = False

    def bad_rate(self) -> float:
        """(errors + degraded + fallback) / inferences."""
        return (self.errors + self.degraded + self.fallback) / max(self.inferences, 1)


class HealthSource(Protocol):
    """Where the controller learns how a device is doing."""

    def health(self, device: str, since: float = 0.0) -> HealthRates | None:
        """The device's current rates (and rollbacks after ``since``), or None if unknown."""


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
    return json.dumps({"model": model, "version": version, "rollout": rollout,
                       "shadow": shadow}).encode()


class RolloutController:
    """Starts, watches, promotes and rolls back rollouts of registered model versions."""

    def __init__(self, registry: Registry, publisher: Publisher,
                 health: HealthSource | None = None, *, min_inferences: int = 20) -> None:
        self.registry = registry
        self.publisher = publisher
        self.health = health
        self.min_inferences = min_inferences
        self._db = sqlite3.connect(registry.home / "registry.db", timeout=30)
        self._db.executescript(_SCHEMA)

    # --- storage ---------------------------------------------------------------------
    def _save(self, r: Rollout) -> None:
        r.updated = time.time()
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO rollouts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.id, r.model, r.version, r.mode, json.dumps(r.devices), json.dumps(r.baseline),
                 r.group, int(r.shadow), r.threshold, r.status, r.reason, r.created, r.updated))

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
        """Stop a running canary whose candidate is unhealthy on any of its devices."""
        if r.status != "running" or self.health is None or r.shadow:
            return r
        for d in r.devices:
            h = self.health.health(d, since=r.created)
            if h is None:
                continue
            if h.rolled_back:
                return self.stop(r, f"{d} rolled back or refused {r.version}", actor=actor,
                                 automatic=True)
            if (h.version == r.version and h.inferences >= self.min_inferences
                    and h.bad_rate() > r.threshold):
                return self.stop(r, f"{d}: error/degraded/fallback rate {h.bad_rate():.2f} "
                                 f"> {r.threshold:.2f} over {h.inferences} inferences",
                                 actor=actor, automatic=True)
        return r

    def watch(self, r: Rollout, seconds: float, interval: float = 0.5) -> Rollout:
        """Check ``r`` every ``interval`` s for ``seconds`` or until it is not running."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and r.status == "running":
            r = self.check(r)
            time.sleep(interval)
        return r

    def stop(self, r: Rollout, reason: str, *, actor: str | None = None,
             automatic: bool = False) -> Rollout:
        """Return each canary device to its baseline version (or clear its assignment)."""
        for d in r.devices:
            base = r.baseline.get(d)
            self.publisher.publish(device_topic(d),
                                   _assignment(r.model, base, r.id) if base else b"")
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        r.status, r.reason = "stopped", reason
        self._save(r)
        self.registry.audit.append("rollout.stopped", actor=actor or ("auto" if automatic else
                                                                       None),
                                   rollout=r.id, model=r.model, version=r.version,
                                   reason=reason, automatic=automatic)
        log.warning("rollout %s of %s@%s stopped: %s", r.id, r.model, r.version, reason)
        return r

    def promote(self, model: str, *, actor: str | None = None) -> Rollout:
        """Make the running rollout's version the fleet-wide assignment."""
        r = self.latest(model, ("running",))
        if r is None:
            raise UsageError(f"no running rollout of {model} to promote")
        previous = self.latest(model, ("promoted",))
        self.publisher.publish(FLEET_TOPIC, _assignment(model, r.version, r.id))
        # Device-specific assignments of earlier canaries would override the fleet one.
        for d in sorted({d for past in self.rollouts(model) for d in past.devices}):
            self.publisher.publish(device_topic(d), b"")
        if r.mode == "group" and r.group:
            self.publisher.publish(group_topic(r.group), b"")
        r.status = "promoted"
        r.baseline = {"fleet": previous.version if previous else None}
        self._save(r)
        self.registry.audit.append("rollout.promote", actor=actor, rollout=r.id, model=model,
                                   version=r.version)
        return r

    def rollback(self, model: str, *, actor: str | None = None) -> Rollout:
        """Stop a running canary, or return the fleet to the version before the last promotion."""
        running = self.latest(model, ("running",))
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
        client.subscribe("edgefleet/v1/update/state/+", qos=1)
        client.subscribe("edgefleet/v1/update/event/+", qos=1)
        self._connected.set()

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
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def fleet(self, settle_s: float = 1.0) -> dict[str, str | None]:
        """Known devices and the version each runs (waits ``settle_s`` for retained states)."""
        time.sleep(settle_s)
        with self._lock:
            return {d: s.get("version") for d, s in self.states.items()}

    def health(self, device: str, since: float = 0.0) -> HealthRates | None:
        """Rates from the device's last state message, and its rollback/refusal events."""
        with self._lock:
            state = self.states.get(device)
            bad = any(e.get("device") == device and e.get("event") in ("rolled_back", "rejected")
                      and float(e.get("ts", 0)) >= since for e in self.events)
        if state is None:
            return None
        h = state.get("health") or {}
        return HealthRates(state.get("version"), int(h.get("inferences", 0)),
                           int(h.get("errors", 0)), int(h.get("degraded", 0)),
                           int(h.get("fallback", 0)), rolled_back=bad)

    def close(self) -> None:
        """Disconnect."""
        self.client.loop_stop()
        self.client.disconnect()


class StoreHealthSource:
    """Health from the telemetry store (``edgefleet ingest``): counter deltas since first asked.

    The store keeps cumulative counts per device; the first call for a device records
    them as its baseline, so later rates cover only what happened since the rollout began.
    """

    def __init__(self, store: Any) -> None:
        self.store = store
        self._base: dict[str, tuple[int, int, int, int]] = {}

    def health(self, device: str, since: float = 0.0) -> HealthRates | None:
        """Rates of ``device`` from its newest stored metrics report."""
        row = self.store.device(device)
        if row is None:
            return None
        counters = (row.get("last_metrics") or {}).get("counters") or {}
        now = (int(row.get("n_inferences") or 0), int(counters.get("inference_errors", 0)),
               int(row.get("n_degraded") or 0), int(row.get("n_fallback") or 0))
        base = self._base.setdefault(device, now)
        d = [max(0, a - b) for a, b in zip(now, base, strict=True)]
        return HealthRates(row.get("model_version"), d[0], d[1], d[2], d[3])
