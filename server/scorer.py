"""The cloud scorer: answers devices' low-confidence samples with the heavier model.

Several scorer processes subscribe to the same *shared* subscription
(``$share/<group>/edgefleet/v1/score/request/+``), so the broker splits the requests
between them and a dead one only loses what it held. Requests go into a bounded queue;
one worker drains it in micro-batches (up to ``max_batch``, waiting at most
``max_wait_ms`` for the batch to fill), runs the batch through a verified
:class:`~edgefleet.device.runtime.predictor.Predictor`, and replies to each request's Response
Topic with its Correlation Data. A bad request gets an error reply and a counter; a
scorer never crashes on input.

Each request is isolated: it is parsed with the guarded JSON reader and checked on its
own before it joins the batch, so one bad request is answered with its error (counted as
``scorer_rejected_<reason>`` and kept in :attr:`Scorer.quarantine`) while the rest of the
micro-batch is scored. The requester is the device of the request topic (the broker ACL
lets only that device publish there) and a reply goes only to that device's own response
topic: a request naming another device's topic is refused without any reply
(``scorer_foreign_response_topic``). If the network thread dies anyway, the batching loop
notices and starts a new one.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, TypeGuard, get_args

import numpy as np
from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink, Will
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.wire.scoring import (
    MAX_REQUEST_BYTES,
    ErrorCode,
    ScoreProtocolError,
    ScoreReply,
    ScoreRequest,
    decode_request,
    encode,
    request_topic,
    requester_of,
    scorer_status_topic,
    shared_request_filter,
    valid_response_topic,
)

__all__ = ["Scorer", "ScorerConfig"]

log = logging.getLogger(__name__)

_ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


def _request_topic_of(job: _Job) -> str:
    """The topic a job's request came in on (for the quarantine)."""
    return request_topic(job.device)


def _is_error_code(reason: str) -> TypeGuard[ErrorCode]:
    return reason in _ERROR_CODES


def _request_error(exc: ScoreProtocolError) -> ErrorCode:
    """The reply's code for a request that did not decode (its reason, if a reply may
    carry it: ``decode_request`` only raises those)."""
    return exc.reason if _is_error_code(exc.reason) else "bad_request"


class ScorerConfig(StrictModel):
    """How one scorer process runs."""

    scorer_id: str = Field(default="scorer", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    group: str = Field(default="scorers", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    max_batch: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: float = Field(default=5.0, ge=0, le=1000)
    queue_size: int = Field(default=1024, ge=1)
    qos: int = Field(default=0, ge=0, le=1)


#: Refused requests kept for inspection (the oldest go first).
QUARANTINE_SIZE = 1000
#: Bounds (s) of ``scorer_request_seconds``: devices' deadlines are tens of ms.
REQUEST_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass
class _Job:
    payload: bytes
    reply_to: str
    corr: bytes | None
    received: float
    device: str = ""


class Scorer:
    """One scorer process's MQTT link, request queue and batching worker.

    Example::

        scorer = Scorer(Predictor.load("out/digits-cloud"), MqttConfig(port=1883))
        scorer.run(stop_event)          # until stop_event is set
    """

    def __init__(self, predictor: Predictor, mqtt: MqttConfig,
                 cfg: ScorerConfig | None = None, metrics: Metrics | None = None) -> None:
        self.predictor = predictor
        self.cfg = cfg or ScorerConfig()
        self.metrics = metrics if metrics is not None else default_metrics()
        m = predictor.manifest
        self.model = f"{m.name}@{m.version}"
        self._queue: queue.Queue[_Job] = queue.Queue(self.cfg.queue_size)
        self._status_topic = scorer_status_topic(self.cfg.scorer_id)
        #: Refused requests: device, topic, reason, detail, size and the first 256 bytes.
        self.quarantine: deque[dict[str, Any]] = deque(maxlen=QUARANTINE_SIZE)
        self._qlock = threading.Lock()
        offline = json.dumps({"state": "offline", "scorer": self.cfg.scorer_id}).encode()
        self.link = MqttLink(mqtt, f"scorer-{self.cfg.scorer_id}", prefix="scorer_mqtt",
                             metrics=self.metrics, will=Will(self._status_topic, offline),
                             on_connected=self._on_connected, on_message=self._on_message)

    # -- network side -------------------------------------------------------------------
    def _on_connected(self, client: Any) -> None:
        client.subscribe(shared_request_filter(self.cfg.group), qos=self.cfg.qos)
        # Published after SUBSCRIBE on the same connection: once someone sees "online",
        # the subscription is in place.
        online = {"state": "online", "scorer": self.cfg.scorer_id, "model": self.model,
                  "group": self.cfg.group}
        client.publish(self._status_topic, json.dumps(online).encode(), qos=1, retain=True)
        log.info("scorer %s online (model %s, group %s)", self.cfg.scorer_id, self.model,
                 self.cfg.group)

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        self.metrics.inc("scorer_requests")
        topic = str(msg.topic)
        props = getattr(msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        corr = getattr(props, "CorrelationData", None)
        device = requester_of(topic)
        if device is None:
            self._refuse(None, topic, "bad_topic", "not a request topic", bytes(msg.payload))
            return
        if not valid_response_topic(reply_to):
            # Nowhere safe to answer: count it, never relay to an arbitrary topic.
            self.metrics.inc("scorer_bad_response_topic")
            log.warning("request on %s without a valid response topic dropped", topic)
            self._refuse(device, topic, "bad_response_topic", f"response topic {reply_to!r}",
                         bytes(msg.payload))
            return
        if not valid_response_topic(reply_to, device):
            # Another device's response topic: answering would let one device spam another.
            self.metrics.inc("scorer_foreign_response_topic")
            log.warning("request from %s asks for replies on %s: refused", device, reply_to)
            self._refuse(device, topic, "foreign_response_topic",
                         f"response topic {str(reply_to)[:200]!r}", bytes(msg.payload))
            return
        job = _Job(bytes(msg.payload), str(reply_to),
                   bytes(corr) if isinstance(corr, bytes | bytearray) else None,
                   time.monotonic(), device)
        if job.corr is None:
            self.metrics.inc("scorer_no_correlation")
        if len(job.payload) > MAX_REQUEST_BYTES:  # refuse before queueing or parsing
            self._refuse(device, topic, "too_large", f"{len(job.payload)} bytes", job.payload)
            self._reply(job, ScoreReply(ok=False, error="too_large",
                                        message=f"request exceeds {MAX_REQUEST_BYTES} bytes"))
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.inc("scorer_overloaded")
            self._reply(job, ScoreReply(ok=False, error="overloaded",
                                        message="scorer queue is full"))

    def _refuse(self, device: str | None, topic: str, reason: str, detail: str,
                payload: bytes) -> None:
        """Count a refused request by reason and keep it in the bounded quarantine."""
        self.metrics.inc(f"scorer_rejected_{reason}")
        with self._qlock:
            self.quarantine.append({
                "ts": time.time(), "device": device, "topic": topic[:512], "reason": reason,
                "detail": detail[:500], "size": len(payload),
                "prefix": payload[:256].decode("utf-8", errors="backslashreplace")})

    def _reply(self, job: _Job, reply: ScoreReply) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = self.link.client
        if client is None:
            self.metrics.inc("scorer_reply_dropped")
            return
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if job.corr is not None:
            props.CorrelationData = job.corr
        try:
            client.publish(job.reply_to, encode(reply), qos=self.cfg.qos, properties=props)
        except (OSError, ValueError, RuntimeError) as exc:
            log.info("reply to %s not sent: %s", job.reply_to, exc)
            self.metrics.inc("scorer_reply_dropped")
            return
        self.metrics.inc("scorer_replies_ok" if reply.ok else f"scorer_errors_{reply.error}")
        # Arrival to reply sent: queueing, batching and the model, what a device waits for.
        self.metrics.observe("scorer_request_seconds", time.monotonic() - job.received,
                             REQUEST_BUCKETS_S)

    # -- batching worker ----------------------------------------------------------------
    def _next_batch(self, timeout: float) -> list[_Job]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        end = time.monotonic() + self.cfg.max_wait_ms / 1e3
        while len(batch) < self.cfg.max_batch:
            left = end - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _parse(self, job: _Job) -> tuple[ScoreRequest, np.ndarray] | None:
        """A valid request and its validated input row, or None after an error reply."""
        topic = _request_topic_of(job)
        try:
            req = decode_request(job.payload)
        except ScoreProtocolError as exc:
            self._refuse(job.device, topic, exc.cause, str(exc), job.payload)
            self._reply(job, ScoreReply(ok=False, error=_request_error(exc),
                                        message=str(exc)[:500]))
            return None
        if time.monotonic() - job.received > req.deadline_ms / 1e3:
            self.metrics.inc("scorer_expired")  # the device has answered on its own already
            return None
        if req.task != self.predictor.manifest.task:
            self._reply(job, ScoreReply(ok=False, error="wrong_task",
                                        message=f"this scorer serves task "
                                                f"{self.predictor.manifest.task!r}"))
            return None
        try:
            row = self.predictor.validate(np.asarray(req.features, dtype=np.float32))
        except InputError as exc:
            self._refuse(job.device, topic, "bad_input", str(exc), job.payload)
            self._reply(job, ScoreReply(ok=False, error="bad_input", message=str(exc)[:500]))
            return None
        if req.raw is not None:
            self.metrics.inc("scorer_raw_received")
        return req, row

    def score(self, batch: list[_Job]) -> None:
        """Answer one micro-batch (errors per request; the batch itself never fails)."""
        good: list[tuple[_Job, np.ndarray]] = []
        for job in batch:
            try:  # each request on its own: one that breaks the checks is answered alone
                parsed = self._parse(job)
            except Exception as exc:
                log.exception("checking a request from %s failed", job.device)
                self._refuse(job.device, _request_topic_of(job), "internal",
                             f"{type(exc).__name__}: {exc}", job.payload)
                self._reply(job, ScoreReply(ok=False, error="bad_request",
                                            message=f"request refused ({type(exc).__name__})"))
                continue
            if parsed is not None:
                good.append((job, parsed[1]))
        if not good:
            return
        try:
            # Each row was validated in _parse: do not check the batch a second time.
            preds = self.predictor.predict_batch_validated(np.concatenate([r for _, r in good]))
        except Exception as exc:  # a runtime failure must not take the scorer down
            log.exception("scoring a batch of %d failed", len(good))
            for job, _ in good:
                self._reply(job, ScoreReply(ok=False, error="internal",
                                            message=type(exc).__name__))
            return
        self.metrics.observe("scorer_batch_size", float(len(good)),
                             (1, 2, 4, 8, 16, 32, 64, 128, 256))
        for (job, _), p in zip(good, preds, strict=True):
            self._reply(job, ScoreReply(ok=True, label=p.label, label_name=p.label_name,
                                        confidence=min(1.0, max(0.0, p.confidence)),
                                        probabilities=[float(v) for v in p.probabilities],
                                        model=self.model, scorer=self.cfg.scorer_id,
                                        batch=len(good)))

    # -- running ------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set: network thread plus this thread batching."""
        net = self._start_network(stop)
        try:
            while not stop.is_set():
                if not net.is_alive():  # the network thread died anyway: start a new one
                    self.metrics.inc("scorer_mqtt_thread_restarts")
                    log.warning("scorer network thread died; starting a new one")
                    self.link.close()
                    net = self._start_network(stop)
                batch = self._next_batch(timeout=0.1)
                if batch:
                    try:
                        self.score(batch)
                    except Exception:  # belt and braces: log, count, keep serving
                        log.exception("scorer worker failed on a batch")
                        self.metrics.inc("scorer_worker_errors")
        finally:
            stop.set()
            net.join(5)
            self._go_offline()

    def _start_network(self, stop: threading.Event) -> threading.Thread:
        net = threading.Thread(target=self._network, args=(stop,), name="scorer-net",
                               daemon=True)
        net.start()
        return net

    def _network(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.link.step(0.05)
            except Exception:
                log.exception("scorer network step failed")
                self.metrics.inc("scorer_mqtt_loop_errors")
                stop.wait(0.1)

    def _go_offline(self) -> None:
        client = self.link.client
        if client is not None and self.link.connected:
            offline = {"state": "offline", "scorer": self.cfg.scorer_id}
            try:
                client.publish(self._status_topic, json.dumps(offline).encode(), qos=1,
                               retain=True)
                client.loop(0.1)
            except Exception:
                log.debug("offline status not sent", exc_info=True)
        self.link.close()

