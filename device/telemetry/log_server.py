"""The device side of remote logs: answers the operator's requests from the :class:`LogRing`.

Topics and payloads are :mod:`edgefleet.device.wire.logs`. Requests are untrusted input:
each is read with the guarded reader, only from this device's own request topic, and
spends a token of a per-device bucket (``rate`` a second, ``burst`` at once); a refusal is
counted (``logs_request_refused_<reason>``) and, when the request had a readable id,
answered with its reason, itself rate-limited. A follow is a lease: new lines are streamed
until it expires unless ``renew`` extends it, at most ``max_follows`` at once, so an
operator who vanished costs at most one lease. One thread owns the MQTT link and all
state; a failing step is logged and counted, never the end of the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink
from edgefleet.device.telemetry.log_ring import LogRing, TokenBucket
from edgefleet.device.wire.logs import (
    LogProtocolError,
    LogRequest,
    LogResponse,
    decode_request,
    encode_chunks,
    request_topic,
    response_topic,
)

__all__ = ["LogServer"]

log = logging.getLogger(__name__)
#: How often follows are pumped, and the most lines one pump sends per follow.
_PUMP_S = 0.25
_PUMP_LINES = 500


@dataclass
class _Follow:
    request: LogRequest
    until: float
    after_seq: int
    seq: int


class LogServer:
    """Serves one device's log requests; :meth:`start` runs its MQTT thread."""

    def __init__(self, device_id: str, ring: LogRing, mqtt: MqttConfig, *,
                 metrics: Metrics | None = None, rate: float = 1.0, burst: float = 3.0,
                 max_follows: int = 2,
                 secrets: Callable[[], list[str]] = list,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device_id = device_id
        self.ring = ring
        self.metrics = metrics if metrics is not None else default_metrics()
        self.max_follows = max_follows
        self._secrets = secrets
        self._clock = clock
        self.bucket = TokenBucket(rate, burst, clock)
        self._error_bucket = TokenBucket(rate, burst, clock)
        self.link = MqttLink(mqtt, f"logs-{device_id}", prefix="logs", metrics=self.metrics,
                             on_connected=self._connected, on_message=self._message)
        self.follows: dict[str, _Follow] = {}
        self._inbox: deque[tuple[str, bytes]] = deque(maxlen=16)
        self._outbox: deque[bytes] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- MQTT callbacks (on the link thread) -----------------------------------------
    def _connected(self, client: Any) -> None:
        client.subscribe(request_topic(self.device_id), qos=1)

    def _message(self, _client: Any, _ud: Any, msg: Any) -> None:
        if len(self._inbox) == self._inbox.maxlen:
            self.metrics.inc("logs_request_dropped")
        self._inbox.append((str(msg.topic), bytes(msg.payload)))

    # --- requests ----------------------------------------------------------------------
    def _refuse(self, reason: str, message: str, request_id: str | None) -> None:
        self.metrics.inc(f"logs_request_refused_{reason}")
        log.warning("log request refused (%s): %s", reason, message)
        if request_id is not None and self._error_bucket.take():
            self._send([LogResponse(request_id, self.device_id, 0, final=True, error=reason,
                                    message=message)])

    def handle(self, topic: str, payload: bytes) -> None:
        """One request (public for tests: no broker needed to exercise refusals)."""
        if topic != request_topic(self.device_id):
            self._refuse("foreign_topic", f"request on {topic[:128]!r}", None)
            return
        try:
            req = decode_request(payload)
        except LogProtocolError as exc:
            self._refuse(exc.reason, str(exc), None)
            return
        if not self.bucket.take():
            self._refuse("rate_limited", "too many log requests: at most one a second",
                         req.id)
            return
        self.metrics.inc(f"logs_requests_{req.op}")
        now = self._clock()
        if req.op == "stop":
            self.follows.pop(req.id, None)
            self._send([LogResponse(req.id, self.device_id, 0, final=True)])
        elif req.op == "renew":
            f = self.follows.get(req.id)
            if f is None:
                self._refuse("unknown_follow", "no follow with this id (expired?)", req.id)
            else:  # acknowledged with an empty chunk: the client knows the device is there
                f.until = now + req.lease_s
                self._send([LogResponse(req.id, self.device_id, f.seq)])
                f.seq += 1
        else:
            if req.op == "follow" and req.id not in self.follows \
                    and len(self.follows) >= self.max_follows:
                self._refuse("too_many_follows",
                             f"at most {self.max_follows} follows at once", req.id)
                return
            lines, last, truncated = self.ring.select(
                since_s=req.since_s, level=req.level, limit=req.lines,
                secrets=self._secrets())
            chunks = encode_chunks(req.id, self.device_id, lines,
                                   final=req.op == "fetch", truncated=truncated)
            if req.op == "follow":
                self.follows[req.id] = _Follow(req, now + req.lease_s, last, len(chunks))
            self._send(chunks)

    def pump(self) -> None:
        """Send new lines to every live follow; end expired ones with a final chunk."""
        now = self._clock()
        for fid, f in list(self.follows.items()):
            if now >= f.until:
                del self.follows[fid]
                self.metrics.inc("logs_follow_expired")
                self._send([LogResponse(fid, self.device_id, f.seq, final=True,
                                        error="lease_expired", message="follow lease ended")])
                continue
            lines, last, _ = self.ring.select(after_seq=f.after_seq, level=f.request.level,
                                              limit=_PUMP_LINES, secrets=self._secrets())
            f.after_seq = last
            if lines:
                chunks = encode_chunks(fid, self.device_id, lines, first_seq=f.seq)
                f.seq += len(chunks)
                self._send(chunks)

    def _send(self, chunks: list[LogResponse]) -> None:
        for c in chunks:
            self._outbox.append(c.encode())
        self.metrics.inc("logs_chunks_sent", len(chunks))

    # --- the thread ----------------------------------------------------------------------
    def _flush(self) -> None:
        client = self.link.client
        if not self.link.connected or client is None:
            self._outbox.clear()  # an answer nobody can receive now is not kept
            return
        while self._outbox:
            client.publish(response_topic(self.device_id), self._outbox.popleft(), qos=1)

    def _run(self) -> None:
        next_pump = 0.0
        while not self._stop.is_set():
            self.link.safe_step(0.05)
            try:
                while self._inbox:
                    self.handle(*self._inbox.popleft())
                if self._clock() >= next_pump:
                    next_pump = self._clock() + _PUMP_S
                    self.pump()
                self._flush()
            except Exception:  # a request that breaks a step must not end the thread
                log.exception("serving a log request failed")
                self.metrics.inc("logs_loop_errors")
                self._outbox.clear()
                self._stop.wait(0.1)
        self.link.close()

    def start(self) -> LogServer:
        """Start the MQTT thread."""
        self._thread = threading.Thread(target=self._run, name="logs-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
