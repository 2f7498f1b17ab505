"""The telemetry publisher: spool first, then MQTT 5 QoS 1, deleted from the spool on PUBACK.

Identity: the MQTT client id is the device id; the broker authenticates it by password or
client certificate. On connect the device publishes a retained ``online`` status; its
last will (sent by the broker when the device vanishes) is a retained ``offline``.
Every message carries ``(device, boot, seq)``: ``boot`` is random per publisher start
and ``seq`` counts from 1, so the ingest can drop the duplicates QoS 1 allows.

One background thread owns the MQTT connection (:class:`MqttLink`): it keeps up to
``window`` messages in flight, oldest first, and after a reconnect re-sends everything
still in the spool.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Literal

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink, Will
from edgefleet.device.telemetry.spool import SpoolLike
from edgefleet.device.wire.telemetry import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Envelope,
    Status,
    encode,
    topic_for,
)

__all__ = ["MessageKind", "TelemetryPublisher"]

#: What a device publishes through the spool (its ``status`` is sent by the link itself).
MessageKind = Literal["metrics", "event"]

log = logging.getLogger(__name__)


class TelemetryPublisher:
    """Spools and publishes ``metrics`` and ``event`` messages for one device."""

    def __init__(self, device_id: str, mqtt: MqttConfig, spool: SpoolLike, *,
                 metrics: Metrics | None = None, window: int = 100,
                 boot_id: str | None = None) -> None:
        self.device_id = device_id
        self.spool = spool
        self.metrics = metrics or default_metrics()
        self.window = window
        self.boot_id = boot_id or secrets.token_hex(8)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # paho mid -> spool id
        self._acked: list[int] = []
        self._last_sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._generation = -1
        offline = Status(v=SCHEMA_VERSION, device=device_id, boot=self.boot_id,
                         state="offline", ts=time.time())
        self.link = MqttLink(
            mqtt, device_id, prefix="telemetry", metrics=self.metrics,
            will=Will(topic_for(device_id, "status"), encode(offline)),
            on_connected=self._connected, on_publish=self._published,
        )

    # -- producing ------------------------------------------------------------------------
    def publish(self, kind: MessageKind, body: dict[str, Any]) -> int:
        """Spool one message and return its sequence number (it is sent in the background).

        A full disk does not raise: the spool drops (and counts) instead.
        """
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
            env = Envelope(v=SCHEMA_VERSION, device=self.device_id, boot=self.boot_id,
                           seq=seq, ts=time.time(), kind=kind, body=body)
            payload = encode(env)
            if len(payload) > MAX_PAYLOAD_BYTES:
                self.metrics.inc("telemetry_oversized_dropped")
                raise UsageError(f"telemetry message of {len(payload)} bytes is above the "
                                 f"{MAX_PAYLOAD_BYTES}-byte limit")
            stored = self.spool.append(topic_for(self.device_id, kind), payload)
        if stored:  # 0: the spool had to drop it (counted there as dropped)
            self.metrics.inc("telemetry_spooled")
        return seq

    # -- paho callbacks (run on the publisher thread, wrapped by MqttLink) ------------------
    def _connected(self, client: Any) -> None:
        online = Status(v=SCHEMA_VERSION, device=self.device_id, boot=self.boot_id,
                        state="online", ts=time.time())
        client.publish(topic_for(self.device_id, "status"), encode(online),
                       qos=1, retain=True)

    def _published(self, _client: Any, _ud: Any, mid: int, rc: Any, _props: Any) -> None:
        spool_id = self._inflight.pop(mid, None)
        if spool_id is None:
            return  # the status message, or a message from an earlier connection
        if rc.is_failure:
            # The broker answered but refused (e.g. not authorized): resending cannot help.
            log.warning("broker refused telemetry message %d: %s", spool_id, rc)
            self.metrics.inc("telemetry_puback_refused")
        else:
            self.metrics.inc("telemetry_published")
        self._acked.append(spool_id)

    # -- the publisher thread --------------------------------------------------------------
    def _fill_window(self) -> None:
        if self.link.generation != self._generation:
            # A new connection: whatever was in flight may be lost; resend from the spool.
            self._generation = self.link.generation
            self._inflight.clear()
            self._last_sent = 0
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        client = self.link.client
        for spool_id, topic, payload in self.spool.pending(self._last_sent, room):
            info = client.publish(topic, payload, qos=1)
            if info.rc != 0:
                self.metrics.inc("telemetry_publish_errors")
                break
            self._inflight[info.mid] = spool_id
            self._last_sent = spool_id

    def step(self, timeout: float = 0.02) -> None:
        """One round of network work: connect, send, read PUBACKs, delete acked rows."""
        if self.link.connected:
            self._fill_window()
        self.link.step(timeout)
        if self._acked:
            acked, self._acked = self._acked, []
            self.spool.ack(acked)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # never let the telemetry thread die
                log.exception("telemetry publisher step failed")
                self.metrics.inc("telemetry_loop_errors")
                time.sleep(0.5)

    def start(self) -> TelemetryPublisher:
        """Start the background publisher thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
            self._thread.start()
        return self

    def drain(self, timeout: float) -> bool:
        """Wait until the spool is empty (everything acknowledged); False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.spool.count() == 0:
                return True
            time.sleep(0.02)
        return self.spool.count() == 0

    def stop(self) -> None:
        """Stop the thread, say ``offline`` (a clean disconnect sends no will), disconnect.

        Whatever is still unacknowledged stays in the spool for the next start.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        client = self.link.client
        if client is not None and self.link.connected:
            offline = Status(v=SCHEMA_VERSION, device=self.device_id, boot=self.boot_id,
                             state="offline", ts=time.time())
            info = client.publish(topic_for(self.device_id, "status"),
                                  encode(offline), qos=1, retain=True)
            end = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < end and self.link.connected:
                self.link.step(0.02)
        self.link.close()
