"""The device end of cloud scoring: MQTT 5 request/response with a hard deadline.

One outbound connection (an :class:`~edgefleet.device.core.mqtt_link.MqttLink`, which
reconnects with jittered backoff and guards every paho callback) carries requests to
``edgefleet/v1/score/request/<device>`` and replies on ``.../response/<device>``. Each
request gets random correlation data; a waiter blocks on its own event until the reply
or the deadline, whichever comes first. A reply that arrives after its deadline is
counted and dropped, never delivered to a later request.

Replies are untrusted input: only one on this device's own response topic, with the
correlation data of a waiting request and within ``MAX_REPLY_BYTES``, reaches a waiter
(the cascade then parses it with the guarded reader, :func:`decode_reply`). If the
network thread dies anyway, the next :meth:`ScoreClient.request` starts a new one.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import LinkThread, MqttConfig, MqttLink
from edgefleet.device.wire.scoring import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    request_topic,
    response_topic,
)

__all__ = ["ScoreClient"]

log = logging.getLogger(__name__)


@dataclass
class _Waiter:
    done: threading.Event = field(default_factory=threading.Event)
    payload: bytes | None = None


class ScoreClient:
    """Sends scoring requests for one device and waits for their replies.

    Example::

        with ScoreClient(MqttConfig(host="broker", port=1883), "pi-17") as client:
            client.wait_connected(5)
            reply = client.request(b"{...}", timeout_s=0.2)   # None: no reply in time
    """

    def __init__(self, mqtt: MqttConfig, device_id: str, *, qos: int = 0,
                 metrics: Metrics | None = None) -> None:
        self.device_id = device_id
        self.qos = qos
        self.metrics = metrics if metrics is not None else default_metrics()
        self.request_topic = request_topic(device_id)
        self.response_topic = response_topic(device_id)
        self._pending: dict[bytes, _Waiter] = {}
        self._lock = threading.Lock()
        self._net: LinkThread | None = None
        self.link = MqttLink(mqtt, f"{device_id}-score", prefix="fallback_mqtt",
                             metrics=self.metrics, on_connected=self._subscribe,
                             on_message=self._on_message)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> ScoreClient:
        """Start the network thread (connects in the background, retrying forever)."""
        if self._net is None:
            self._net = LinkThread(self.link, "score-client").start()
        return self

    def close(self) -> None:
        """Stop the network thread and disconnect; waiting requests time out."""
        if self._net is not None:
            self._net.join(5)
            self._net = None
        self.link.close()

    def __enter__(self) -> ScoreClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        return self.link.connected

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected (and subscribed), or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self.link.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.link.connected

    # -- paho callbacks (MqttLink wraps them: exceptions are logged and counted) --------
    def _subscribe(self, client: Any) -> None:
        # SUBSCRIBE goes out before any request on this connection, and the broker handles
        # one connection's packets in order, so no reply can miss the subscription.
        client.subscribe(self.response_topic, qos=self.qos)

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        if msg.topic != self.response_topic:
            self.metrics.inc("fallback_reply_foreign_topic")
            return
        if len(msg.payload) > MAX_REPLY_BYTES:
            self.metrics.inc("fallback_reply_too_large")
            return
        corr = getattr(msg.properties, "CorrelationData", None)
        if not isinstance(corr, bytes | bytearray):
            self.metrics.inc("fallback_reply_uncorrelated")
            log.warning("reply on %s without correlation data dropped", msg.topic)
            return
        with self._lock:
            waiter = self._pending.get(bytes(corr))
        if waiter is None:
            self.metrics.inc("fallback_reply_late")
            return
        waiter.payload = bytes(msg.payload)
        waiter.done.set()

    # -- requests -----------------------------------------------------------------------
    def request(self, payload: bytes, timeout_s: float) -> bytes | None:
        """Publish one request and wait up to ``timeout_s`` for its reply payload.

        Returns None when not connected, when the publish fails, or on timeout; the
        caller decides what a missing answer means (a degraded local answer).
        """
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        if len(payload) > MAX_REQUEST_BYTES:  # the broker would drop our whole connection
            self.metrics.inc("fallback_request_too_large")
            return None
        if self._net is not None:
            self._net.ensure()  # a dead network thread is started again
        client = self.link.client
        if client is None or not self.link.connected:
            self.metrics.inc("fallback_not_connected")
            return None
        corr = os.urandom(16)
        waiter = _Waiter()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.response_topic
        props.CorrelationData = corr
        # A request older than a second is useless: let the broker drop it.
        props.MessageExpiryInterval = max(1, math.ceil(timeout_s))
        with self._lock:
            self._pending[corr] = waiter
        try:
            try:
                info = client.publish(self.request_topic, payload, qos=self.qos,
                                      properties=props)
            except (OSError, ValueError, RuntimeError) as exc:
                log.info("scoring request not sent: %s", exc)
                self.metrics.inc("fallback_publish_errors")
                return None
            if info.rc != 0:
                self.metrics.inc("fallback_publish_errors")
                return None
            if not waiter.done.wait(timeout_s):
                self.metrics.inc("fallback_timeouts")
                return None
            return waiter.payload
        finally:
            with self._lock:
                self._pending.pop(corr, None)
