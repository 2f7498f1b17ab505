"""The rollout side of the broker: device update states and events in, assignments out.

Built on :class:`~edgefleet.device.core.mqtt_link.MqttLink` like every other client, so
a broker restart brings jittered reconnects (not a fleet of tools in lockstep), a failing
callback is logged instead of killing the network thread, and the state and event
subscriptions are made again on every new connection.

Every state and event is untrusted device input, retained ones included: it is read
with the guarded JSON reader (:func:`~edgefleet.device.wire.updates.read_report`), and
its device is the topic's (the broker ACL binds a device's user name to its own topics):
an event on ``event/pi-7`` that says ``"device": "pi-3"`` is refused, so one device cannot
report a rollback for another and stop its canary. A refused message is counted
(``rollout_view_rejected_<reason>``) and kept in :attr:`FleetView.quarantine` (bounded);
a message that breaks the handler anyway is counted by the link's callback guard; and if
the network thread dies all the same, :attr:`FleetView.connected` says so (the guard then
opens a new view) after starting a new thread.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import deque
from typing import Any

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.core.guarded_json import JsonRejected
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import LinkThread, MqttConfig, MqttLink
from edgefleet.device.wire.updates import (
    ASSIGN_ROOT,
    EVENT_FILTER,
    STATE_FILTER,
    device_of,
    read_report,
)
from edgefleet.server.rollout.event_log import EventLog
from edgefleet.server.rollout.records import HealthRates, json_number, json_object

__all__ = ["FleetView"]

_PREFIX = "rollout_view"
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,2}$")
#: Refused messages kept for inspection, and events kept for health (oldest go first).
QUARANTINE_SIZE = 1000
EVENTS_KEPT = 10_000

log = logging.getLogger(__name__)


class FleetView:
    """Sees device update states and events and publishes assignments (one network thread)."""

    def __init__(self, host: str, port: int, client_id: str | None = None, *,
                 username: str | None = None, password: str | None = None,
                 connect_timeout: float = 10.0) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        #: Recent events, :data:`EVENTS_KEPT` at most, indexed by device (a check reads
        #: only its devices' events).
        self.events = EventLog(EVENTS_KEPT)
        #: Refused messages: device, topic, reason, detail, size and the first 256 bytes.
        self.quarantine: deque[dict[str, Any]] = deque(maxlen=QUARANTINE_SIZE)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.metrics = Metrics()
        cfg = MqttConfig(host=host, port=port, username=username, password=password)
        self.link = MqttLink(cfg, client_id or f"rollout-{uuid.uuid4().hex[:8]}",
                             prefix=_PREFIX, metrics=self.metrics,
                             on_connected=self._subscribe, on_message=self._on_message)
        self._net = LinkThread(self.link, "fleet-view", self._stop).start()
        try:
            self._wait_connected(f"{host}:{port}", connect_timeout)
        except BaseException:
            self.close()
            raise

    def _wait_connected(self, where: str, timeout: float) -> None:
        """Wait for the first connection; an unreachable or refusing broker fails fast."""
        end = time.monotonic() + timeout
        while not self.link.connected:
            if self.metrics.counter(f"{_PREFIX}_connect_errors"):
                raise EdgefleetError(f"cannot reach the MQTT broker at {where}")
            if self.metrics.counter(f"{_PREFIX}_connect_refused") or time.monotonic() > end:
                raise EdgefleetError(f"the MQTT broker at {where} did not accept the "
                                     "connection (credentials? EDGEFLEET_MQTT_USERNAME/PASSWORD)")
            time.sleep(0.02)

    def _subscribe(self, client: Any) -> None:
        client.subscribe(STATE_FILTER, qos=1)
        client.subscribe(EVENT_FILTER, qos=1)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up now (the link reconnects in the background).

        False while the network thread is dead, whatever the link last knew; asking starts
        a new thread, which reconnects and subscribes again.
        """
        alive = self._net.alive
        if not alive:
            self._net.ensure()
        return alive and self.link.connected

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        topic, payload = str(msg.topic), bytes(msg.payload)
        where = device_of(topic)
        if where is None:
            self._refuse(None, topic, "bad_topic", "not a state or event topic", payload)
            return
        kind, device = where
        if kind == "state" and not payload:  # an empty retained message clears the state
            with self._lock:
                self.states.pop(device, None)
            return
        try:
            body = read_report(device, payload)
        except JsonRejected as exc:
            self._refuse(device, topic, exc.reason, str(exc), payload)
            return
        with self._lock:
            if kind == "state":
                self.states[device] = body
            else:
                self.events.append(body)

    def _refuse(self, device: str | None, topic: str, reason: str, detail: str,
                payload: bytes) -> None:
        log.warning("refused %s from %s: %s (%s)", topic[:120], device, reason, detail[:200])
        self.metrics.inc(f"{_PREFIX}_rejected_{reason}")
        self.metrics.inc(f"{_PREFIX}_quarantined")
        with self._lock:
            self.quarantine.append({
                "ts": time.time(), "device": device, "topic": topic[:512], "reason": reason,
                "detail": detail[:500], "size": len(payload),
                "prefix": payload[:256].decode("utf-8", errors="backslashreplace")})

    def rejected(self) -> dict[str, int]:
        """Refused messages by reason since this view started."""
        pre = f"{_PREFIX}_rejected_"
        counters = self.metrics.snapshot()["counters"]
        return {k[len(pre):]: int(v) for k, v in counters.items() if k.startswith(pre)}

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish QoS 1 and wait until the broker has it."""
        if not topic.startswith(ASSIGN_ROOT):
            raise UsageError(f"refusing to publish outside {ASSIGN_ROOT}: {topic}")
        client = self.link.client
        if client is None or not self.link.connected:
            raise EdgefleetError(f"not connected to the MQTT broker: {topic} not published")
        info = client.publish(topic, payload, qos=1, retain=retain)
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

    def assign_seq(self, device: str) -> int | None:
        """The last director seq the device's state reports (None: no state or no seq)."""
        with self._lock:
            seq = self.states.get(device, {}).get("assign_seq")
        return seq if type(seq) is int and 0 <= seq < 2**53 else None

    def members(self, group: str) -> list[str]:
        """Devices whose state lists ``group``."""
        with self._lock:
            return sorted(d for d, s in self.states.items()
                          if isinstance(s.get("groups"), list) and group in s["groups"])

    def models(self) -> dict[str, str | None]:
        """Known devices and the model each runs (None: none yet)."""
        with self._lock:
            return {d: s["model"] if isinstance(s.get("model"), str) else None
                    for d, s in self.states.items()}

    def highest(self, device: str, model: str) -> str | None:
        """The highest version of ``model`` the device's state reports having seen."""
        with self._lock:
            seen = json_object(json_object(self.states.get(device, {}).get("highest_seen"))
                               .get("models")).get(model)
        return seen if isinstance(seen, str) and _VERSION_RE.fullmatch(seen) else None

    def health(self, device: str, since: float = 0.0,
               rollout: str | None = None) -> HealthRates | None:
        """Rates from the device's last state message, and its rollback/refusal events.

        Events are not retained, so a watcher that connects later learns of a refusal from
        the state's ``last`` outcome instead (``refused``).
        """
        with self._lock:
            state = self.states.get(device)
            bad = any(e.get("event") in ("rolled_back", "rejected")
                      and json_number(e.get("ts")) >= since for e in self.events.of(device))
        if state is None:
            return None
        h, last = json_object(state.get("health")), json_object(state.get("last"))
        refused = last.get("target") if last.get("outcome") == "rejected" else None
        return HealthRates(state.get("version"), int(json_number(h.get("inferences"))),
                           int(json_number(h.get("errors"))), int(json_number(h.get("degraded"))),
                           int(json_number(h.get("fallback"))), rolled_back=bad,
                           refused=refused if isinstance(refused, str) else None,
                           measured=isinstance(state.get("health"), dict))

    def close(self) -> None:
        """Stop the network thread, which disconnects."""
        self._net.join(5)
        self.link.close()
