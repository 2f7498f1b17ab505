"""The device side of rollouts: retained MQTT assignments in, update state and events out.

Topics and payloads are :mod:`edgefleet.device.wire.updates` (docs/updates.md). The most
specific assignment wins (device, then group, then fleet); an empty retained message
clears one. Assignments only *name* a version: the bytes come through TUF, which refuses
anything its signed metadata does not vouch for. Updates run on a worker thread, so
inference and the MQTT loop never wait for a download or a trial load.

Assignments are untrusted input, retained ones included: each is read with the guarded
JSON reader (through :func:`~edgefleet.device.wire.updates.decode_assignment`) and only
from the topics this device subscribed to; a refused one is counted and reported, and a
handler that fails anyway is counted (``update_message_errors``) without ending the
MQTT thread, whose loop survives any failing step.

With a director key pinned (:class:`~edgefleet.device.updates.director.DirectorTrust`) the
device listens to its own assignment topic only: group and fleet messages cannot carry
a per-device signature and sequence number. Every message there must be a v2 assignment
the director signed for this device; anything else is refused with its reason
(``unsigned_assignment``, ``bad_signature``, ``wrong_device``, ``expired``, ``replayed``),
counted (``update_assignment_refused_<reason>``) and reported (event
``assignment_refused``), and the device keeps serving what it serves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any

from edgefleet.device.core.errors import UpdateRejected, UpdateUnavailable
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink
from edgefleet.device.core.retry import Backoff
from edgefleet.device.updates.director import DirectorTrust
from edgefleet.device.updates.installer import Updater
from edgefleet.device.wire.updates import (
    FLEET_TOPIC,
    MAX_ASSIGNMENT_BYTES,
    Assignment,
    decode_assignment,
    decode_signed_assignment,
    device_topic,
    encode_event,
    encode_state,
    event_topic,
    group_topic,
    state_topic,
)

__all__ = ["UpdateAgent"]

log = logging.getLogger(__name__)

class UpdateAgent:
    """Follows assignments for one device; ``start()`` runs the MQTT and worker threads."""

    def __init__(self, device_id: str, updater: Updater, mqtt: MqttConfig, *,
                 groups: tuple[str, ...] = (), metrics: Metrics | None = None,
                 state_interval: float = 2.0, backoff: Backoff | None = None,
                 director: DirectorTrust | None = None) -> None:
        self.device_id = device_id
        self.director = director
        self.groups = groups
        self.updater = updater
        self.metrics = metrics if metrics is not None else default_metrics()
        self.state_interval = state_interval
        self.backoff = backoff or Backoff(base=1.0, cap=60.0)
        self.link = MqttLink(mqtt, f"upd-{device_id}", prefix="update", metrics=self.metrics,
                             on_connected=self._connected, on_message=self._message)
        self._sources: dict[str, Assignment | None] = {}
        self._wanted: queue.Queue[Assignment | None] = queue.Queue()
        self._outbox: deque[tuple[str, bytes, bool]] = deque(maxlen=1000)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_outcome: dict[str, Any] = {}
        updater.events = self._event

    # --- MQTT side (link thread) -----------------------------------------------------
    def _topics(self) -> list[str]:
        if self.director is not None:
            return [device_topic(self.device_id)]
        return [device_topic(self.device_id), *(group_topic(g) for g in self.groups),
                FLEET_TOPIC]

    def _connected(self, client: Any) -> None:
        for t in self._topics():
            client.subscribe(t, qos=1)
        self._queue_state()

    def _message(self, _client: Any, _ud: Any, msg: Any) -> None:
        try:
            self._handle(msg)
        except Exception:
            log.exception("assignment on %s could not be handled", getattr(msg, "topic", "?"))
            self.metrics.inc("update_message_errors")

    def _handle(self, msg: Any) -> None:
        if msg.topic not in self._topics():
            self.metrics.inc("update_assignment_foreign_topic")
            return
        if len(msg.payload) > MAX_ASSIGNMENT_BYTES:
            self.metrics.inc("update_assignment_invalid")
            log.warning("assignment on %s is %d bytes: ignored", msg.topic, len(msg.payload))
            return
        try:
            assignment = self._read(bytes(msg.payload))
        except UpdateRejected as exc:
            if exc.reason in ("bad_assignment", "too_large"):
                self.metrics.inc("update_assignment_invalid")
                self._event("assignment_invalid", topic=msg.topic, error=str(exc))
                return
            log.warning("assignment on %s refused (%s): %s", msg.topic, exc.reason, exc)
            self.metrics.inc(f"update_assignment_refused_{exc.reason}")
            self._event("assignment_refused", topic=msg.topic, reason=exc.reason,
                        target=getattr(exc, "target", None), error=str(exc))
            return
        self._sources[msg.topic] = assignment
        self._wanted.put(self.effective())

    def _read(self, payload: bytes) -> Assignment | None:
        """The assignment of one message (None: cleared); raises the refusal."""
        if self.director is None:
            return decode_assignment(payload)
        signed = decode_signed_assignment(payload)
        return self.director.accept(signed) if signed is not None else None

    def effective(self) -> Assignment | None:
        """The most specific assignment received so far."""
        for t in self._topics():
            a = self._sources.get(t)
            if a is not None:
                return a
        return None

    def _event(self, kind: str, **data: Any) -> None:
        self._outbox.append((event_topic(self.device_id),
                             encode_event(self.device_id, kind, **data), False))
        self._queue_state()

    def state(self) -> dict[str, Any]:
        """What the retained state message says."""
        _slot, info = self.updater.slots.active()
        return {
            "device": self.device_id, "groups": list(self.groups), "ts": time.time(),
            "model": info.name if info else None, "version": info.version if info else None,
            "shadow": (self.updater.serving.shadow.manifest.version
                       if self.updater.serving.shadow else None),
            "shadow_agreement": self.updater.serving.shadow_agreement(),
            "shadow_latency_ms": self.updater.serving.shadow_latency_ms(),
            "health": self.updater.serving.health(),
            "highest_seen": {**self.updater.tuf.highest.versions,
                             "models": self.updater.tuf.highest.models},
            "last": self.last_outcome,
            # What the director signs the next assignment above (and with which key).
            "assign_seq": self.director.seq if self.director else None,
            "director_key": self.director.keyid if self.director else None,
        }

    def _queue_state(self) -> None:
        self._outbox.append((state_topic(self.device_id), encode_state(self.state()), True))

    def _run_link(self) -> None:
        next_state = 0.0
        while not self._stop.is_set():
            self.link.safe_step(0.05)
            if not self.link.connected or self.link.client is None:
                continue
            try:
                if time.monotonic() >= next_state:
                    next_state = time.monotonic() + self.state_interval
                    self._queue_state()
                while self._outbox:
                    topic, payload, retain = self._outbox.popleft()
                    self.link.client.publish(topic, payload, qos=1, retain=retain)
            except Exception:  # a state that cannot be built or sent: the loop goes on
                log.exception("publishing the update state failed")
                self.metrics.inc("update_loop_errors")
                self._stop.wait(0.1)
        self.link.close()

    # --- worker side -----------------------------------------------------------------
    def _run_worker(self) -> None:
        current: Assignment | None = None
        while not self._stop.is_set():
            self._ensure_link_thread()
            try:
                current = self._wanted.get(timeout=0.2)
            except queue.Empty:
                continue
            while not self._wanted.empty():  # only the newest assignment matters
                current = self._wanted.get_nowait()
            if current is not None:
                self._apply(current)

    def _apply(self, a: Assignment) -> None:
        while not self._stop.is_set():
            try:
                outcome = self.updater.apply(a)
                self.last_outcome = {"target": a.target, "outcome": outcome}
                self.backoff.reset()
                break
            except UpdateUnavailable as exc:
                # The retained state says why the device is not on it yet (a revoked
                # certificate, a registry down); "retrying" is no refusal for a canary.
                self.last_outcome = {"target": a.target, "outcome": "retrying",
                                     "reason": exc.reason}
                self._queue_state()
                delay = self.backoff.next_delay()
                log.info("repository unavailable (%s); retrying in %.1f s", exc, delay)
                if self._stop.wait(delay) or not self._wanted.empty():
                    break
            except Exception as exc:  # refused: already counted and reported by the updater
                self.last_outcome = {"target": a.target, "outcome": "rejected",
                                     "reason": getattr(exc, "reason", type(exc).__name__)}
                break
        self._queue_state()

    def _ensure_link_thread(self) -> None:
        """A dead MQTT thread (it should never die) is noticed and started again."""
        if self._threads and not self._threads[0].is_alive() and not self._stop.is_set():
            self.metrics.inc("update_thread_restarts")
            log.warning("the update MQTT thread died; starting a new one")
            self.link.close()
            t = threading.Thread(target=self._run_link, name="update-mqtt", daemon=True)
            t.start()
            self._threads[0] = t

    def start(self) -> UpdateAgent:
        """Start the MQTT and worker threads."""
        for name, fn in (("update-mqtt", self._run_link), ("update-worker", self._run_worker)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop both threads (an update in progress finishes its current step first)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
