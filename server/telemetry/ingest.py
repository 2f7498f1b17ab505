"""``edgefleet ingest run``: MQTT telemetry into the fleet store, exactly once.

The service joins the shared subscription ``$share/<group>/edgefleet/v1/+/+`` (several
ingest processes split the load; see :attr:`IngestConfig.shared` for the broker-restart
caveat) with a persistent session (fixed client id,
``clean_start=False``, a session expiry), so the broker queues messages while it is
restarting. Acknowledgements are manual: a message is PUBACKed only after the
transaction that stored it has committed, so a crash of the ingest loses nothing; the
broker then redelivers, and ``UNIQUE (device, boot, seq)`` drops the duplicate.

Messages are written in batches (up to ``batch_size`` or ``batch_interval`` seconds) in
one transaction; registry rows and alerts are updated once per device per batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink
from edgefleet.device.wire.telemetry import MAX_PAYLOAD_BYTES, TOPIC_ROOT, MetricsBody
from edgefleet.server.telemetry.alerts import AlertThresholds, check_metrics, check_silent
from edgefleet.server.telemetry.store import Store
from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message

__all__ = ["IngestConfig", "IngestService"]

log = logging.getLogger(__name__)


class IngestConfig(StrictModel):
    """Settings of ``edgefleet ingest run`` (the ``[ingest]`` table of its TOML)."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    client_id: str = "edgefleet-ingest"
    group: str = "ingest"
    #: Default: one ingest with an ordinary persistent subscription, which the broker
    #: restores after a restart and queues for while the ingest is away: nothing is lost.
    #: ``shared = true`` joins ``$share/<group>/...`` so several ingest processes split the
    #: load, but mosquitto 2.0 does not restore shared subscriptions from its persistence
    #: file: messages published after a broker restart and before the ingest re-subscribes
    #: are lost. Choose it only for throughput, with a broker that keeps them.
    shared: bool = False
    session_expiry: int = Field(default=7 * 24 * 3600, ge=0)
    batch_size: int = Field(default=500, ge=1)
    batch_interval: float = Field(default=0.05, gt=0)
    max_payload_bytes: int = Field(default=MAX_PAYLOAD_BYTES, ge=256)
    alerts: AlertThresholds = Field(default_factory=AlertThresholds)
    #: How often silent devices are looked for.
    silent_check_every: float = Field(default=5.0, gt=0)


@dataclass
class _Batch:
    items: list[tuple[int, int, int, Accepted]] = field(default_factory=list)  # gen, mid, qos
    rejects: dict[str, int] = field(default_factory=dict)
    reject_acks: list[tuple[int, int, int]] = field(default_factory=list)
    started: float = 0.0

    def __len__(self) -> int:
        return len(self.items) + len(self.reject_acks)


class IngestService:
    """Consumes the telemetry topics and writes the store; run :meth:`run` in a thread."""

    def __init__(self, store: Store, cfg: IngestConfig | None = None, *,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.cfg = cfg or IngestConfig()
        self.metrics = metrics or default_metrics()
        self._batch = _Batch()
        self._stop = threading.Event()
        self._last_silent_check = 0.0
        self.stored = 0
        self.duplicates = 0
        self.link = MqttLink(
            self.cfg.mqtt, self.cfg.client_id, prefix="ingest", metrics=self.metrics,
            clean_start=False, session_expiry=self.cfg.session_expiry, manual_ack=True,
            on_connected=self._subscribe, on_message=self._on_message,
        )

    def _subscribe(self, client: Any) -> None:
        topic = f"{TOPIC_ROOT}/+/+"
        client.subscribe(f"$share/{self.cfg.group}/{topic}" if self.cfg.shared else topic, qos=1)

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        result = validate_message(msg.topic, msg.payload, self.cfg.max_payload_bytes)
        b = self._batch
        if not len(b):
            b.started = time.monotonic()
        key = (self.link.generation, int(msg.mid), int(msg.qos))
        if isinstance(result, Rejected):
            log.warning("rejected telemetry on %s: %s (%s)", msg.topic[:120], result.reason,
                        result.detail)
            self.metrics.inc(f"ingest_rejected_{result.reason}")
            b.rejects[result.reason] = b.rejects.get(result.reason, 0) + 1
            b.reject_acks.append(key)
        else:
            b.items.append((*key, result))

    # -- writing ----------------------------------------------------------------------------
    def _write(self, batch: _Batch, now: float) -> tuple[int, int]:
        new = dup = 0
        per_device: dict[str, list[int]] = {}
        latest: dict[str, tuple[float, MetricsBody]] = {}
        with self.store.transaction() as st:
            for _g, _m, _q, acc in batch.items:
                if acc.status is not None:
                    s = acc.status
                    st.set_status(s.device, s.state == "online", s.ts, s.boot)
                    continue
                env = acc.envelope
                assert env is not None
                counts = per_device.setdefault(env.device, [0, 0])
                if not st.insert_message(env.device, env.boot, env.seq, env.kind, env.ts, now,
                                         acc.text):
                    counts[1] += 1
                    dup += 1
                    continue
                counts[0] += 1
                new += 1
                if acc.metrics is not None:
                    prev = latest.get(env.device)
                    if prev is None or env.ts >= prev[0]:
                        latest[env.device] = (env.ts, acc.metrics)
                elif env.kind == "event":
                    kind = str(env.body.get("kind", "event"))[:64]
                    st.add_event(env.ts, env.device, f"device.{kind}", "info",
                                 str(env.body.get("message", kind))[:500], env.body)
            for device, (n_new, n_dup) in per_device.items():
                st.touch_device(device, now, n_new, n_dup)
            for device, (ts, body) in latest.items():
                if st.update_metrics(device, ts, _registry_fields(body),
                                     body.model_dump(mode="json")):
                    check_metrics(st, device, body, now, self.cfg.alerts)
            if batch.rejects:
                st.count_rejects(batch.rejects)
        return new, dup

    def flush(self) -> None:
        """Commit the current batch, then PUBACK its messages (never before the commit)."""
        batch, self._batch = self._batch, _Batch()
        if not len(batch):
            return
        new, dup = self._write(batch, time.time())
        self.stored += new
        self.duplicates += dup
        self.metrics.inc("ingest_stored", new)
        self.metrics.inc("ingest_duplicates", dup)
        client = self.link.client
        for gen, mid, qos in [(g, m, q) for g, m, q, _ in batch.items] + batch.reject_acks:
            # A PUBACK belongs to the connection that delivered the message; after a
            # reconnect the broker redelivers it and the store drops the duplicate.
            if qos and client is not None and gen == self.link.generation and self.link.connected:
                client.ack(mid, qos)

    def step(self) -> None:
        """One round: network, then flush when the batch is full or old enough."""
        self.link.step(0.02)
        b = self._batch
        if len(b) and (len(b) >= self.cfg.batch_size
                       or time.monotonic() - b.started >= self.cfg.batch_interval):
            self.flush()
        now = time.time()
        if now - self._last_silent_check >= self.cfg.silent_check_every:
            self._last_silent_check = now
            with self.store.transaction() as st:
                check_silent(st, now, self.cfg.alerts)

    def run(self) -> None:
        """Ingest until :meth:`stop`; store errors are logged, counted and retried."""
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                # Unacknowledged messages are redelivered after the reconnect below.
                log.exception("ingest step failed; reconnecting")
                self.metrics.inc("ingest_loop_errors")
                self._batch = _Batch()
                self.link.close()
                time.sleep(0.5)
        try:
            self.flush()
        finally:
            self.link.close()

    def stop(self) -> None:
        """Ask :meth:`run` to flush and return."""
        self._stop.set()


def _registry_fields(body: MetricsBody) -> dict[str, Any]:
    drift = body.drift or {}
    return {
        "model_name": body.model.get("name"), "model_version": body.model.get("version"),
        "training_state": body.training.get("state"),
        "epsilon": body.training.get("epsilon"),
        "n_inferences": body.inferences, "n_local": body.local,
        "n_fallback": body.fallback, "n_degraded": body.degraded,
        "drift_input": drift.get("input_psi"), "drift_confidence": drift.get("confidence_psi"),
        "spool_dropped": int(body.spool.get("dropped", 0)),
    }
