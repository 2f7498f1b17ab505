"""``edgefleet ingest run``: MQTT telemetry into the fleet store, exactly once.

The service subscribes to ``edgefleet/v1/+/+`` with a persistent session (fixed client
id, ``clean_start=False``, a session expiry), so the broker queues messages while the
ingest or the broker is restarting. Acknowledgements are manual: a message is PUBACKed
only after the transaction that stored it has committed, so a crash of the ingest loses
nothing; the broker then redelivers, and ``UNIQUE (device, boot, seq)`` drops the
duplicate.

Scale-out: ``workers = K`` ingest processes (``worker = 0 .. K-1``) each keep their own
persistent session on the same ordinary subscription and store only the devices of
their partition (:func:`partition_of`, a hash of the device id); the others' messages
are acknowledged unread. Not a ``$share`` group: mosquitto 2.0 never writes shared
subscriptions to its persistence file (``persist__subs_save`` walks only ordinary
subscriptions), so after a broker restart a shared group has no subscription until its
members re-subscribe, and what devices publish in between is dropped (docs/telemetry.md).

Messages are written in batches (up to ``batch_size`` or ``batch_interval`` seconds) in
one transaction; registry rows and alerts are updated once per device per batch, the
batch's open alerts read in one query. Under :meth:`IngestService.run` a batch commits
on a writer thread while the network thread receives and validates the next; the
PUBACKs are sent from the network thread once the commit is done.

One message never hurts the others: each is validated on its own as it arrives (the
guarded JSON reader's limits, the device id from the topic, the clock skew) before it
joins a batch; a refused one is acknowledged, counted by reason
(``ingest_rejected_<reason>`` and the store's ``rejects``) and kept in the bounded
``quarantine`` table with its device, topic, reason and first bytes. A batch is first
written all at once (one pipelined insert on PostgreSQL); if that fails for any reason
but an outage, it is written again message by message, each inside its own savepoint,
so one whose writes fail anyway is rolled back alone and quarantined (``store_error``),
never the batch. Only a database outage (``OperationalError``) fails the batch, which
is then redelivered.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink
from edgefleet.device.wire.telemetry import MAX_PAYLOAD_BYTES, TOPIC_ROOT, Envelope, MetricsBody
from edgefleet.server.telemetry.alerts import AlertThresholds, check_metrics, check_silent
from edgefleet.server.telemetry.store import QUARANTINE_ROWS, Store
from edgefleet.server.telemetry.validate import Accepted, Rejected, validate_message

__all__ = ["COMMIT_BUCKETS_S", "MAX_WORKERS", "IngestConfig", "IngestService", "partition_of"]

#: Upper bound of ``workers`` (each worker receives every message, see IngestConfig).
MAX_WORKERS = 64
#: A batch waiting for a busy writer grows up to this many ``batch_size``s, then waits.
_BACKLOG = 4

#: Bounds (s) of ``ingest_batch_commit_seconds``: one batch's transaction, 1 ms to 10 s.
COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

log = logging.getLogger(__name__)


class IngestConfig(StrictModel):
    """Settings of ``edgefleet ingest run`` (the ``[ingest]`` table of its TOML)."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    #: The persistent session's client id (worker ``i > 0`` of ``K``: ``<id>-<i>of<K>``).
    client_id: str = "edgefleet-ingest"
    #: How many ingest processes share the fleet, and which one this is. Each keeps its
    #: own persistent session on the ordinary subscription, so the broker keeps it across
    #: restarts and queues for a worker that is down; each stores the devices whose
    #: :func:`partition_of` is its index and acknowledges the rest unread (the broker
    #: sends every message to every worker: a cheap skip here, K copies at the broker).
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS)
    worker: int = Field(default=0, ge=0)
    #: Removed: ``$share`` groups lose messages across a broker restart on mosquitto 2.0.
    shared: bool = False
    session_expiry: int = Field(default=7 * 24 * 3600, ge=0)
    batch_size: int = Field(default=500, ge=1)
    batch_interval: float = Field(default=0.05, gt=0)
    max_payload_bytes: int = Field(default=MAX_PAYLOAD_BYTES, ge=256)
    #: A message stamped further ahead of its receive time than this is refused
    #: (``clock_skew``): one device must not freeze its row with a far-future report.
    max_future_s: float = Field(default=300.0, gt=0)
    #: Refuse reports older than this (seconds; default: any age, spools can be old).
    max_age_s: float | None = Field(default=None, gt=0)
    #: Rows the quarantine table keeps.
    quarantine_rows: int = Field(default=QUARANTINE_ROWS, ge=1)
    alerts: AlertThresholds = Field(default_factory=AlertThresholds)
    #: How often silent devices are looked for.
    silent_check_every: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check_partition(self) -> IngestConfig:
        if self.shared:
            raise ValueError("shared subscriptions were removed: mosquitto 2.0 does not "
                             "restore them after a restart and drops what arrives before "
                             "the ingest re-subscribes; run K workers (workers = K, "
                             "worker = 0..K-1) instead")
        if self.worker >= self.workers:
            raise ValueError(f"worker must be 0..{self.workers - 1} (workers = {self.workers})")
        return self

    @property
    def session_id(self) -> str:
        """The client id of this worker's persistent session. Worker 0 of 1 keeps the
        historical id; with K workers the id names K, so changing K starts fresh
        sessions next to the old ones (docs/operations.md: changing the number of
        workers) instead of re-reading an old queue under a new partition."""
        if self.workers == 1:
            return self.client_id
        return f"{self.client_id}-{self.worker}of{self.workers}"


def partition_of(device: str, workers: int) -> int:
    """The ingest worker that stores ``device``'s messages: CRC-32 of the id modulo K.

    Stable across processes, machines and Python versions (unlike ``hash()``)."""
    return zlib.crc32(device.encode("utf-8", "surrogateescape")) % workers


@dataclass(frozen=True)
class _Refused:
    device: str | None
    topic: str
    reason: str
    detail: str
    payload: bytes
    received: float


@dataclass
class _Batch:
    items: list[tuple[int, int, int, Accepted]] = field(default_factory=list)  # gen, mid, qos
    rejects: dict[str, int] = field(default_factory=dict)
    reject_acks: list[tuple[int, int, int]] = field(default_factory=list)
    refused: list[_Refused] = field(default_factory=list)
    started: float = 0.0
    #: Messages whose writes failed alone (``store_error``), counted by the writer.
    store_errors: int = 0

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
        #: While :meth:`run` runs: the writer thread and the batch it is committing.
        self._writer: ThreadPoolExecutor | None = None
        self._inflight: tuple[_Batch, Future[tuple[int, int]]] | None = None
        self._stop = threading.Event()
        self._last_silent_check = 0.0
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0
        #: Messages of other workers' partitions, acknowledged unread.
        self.skipped = 0
        self.link = MqttLink(
            self.cfg.mqtt, self.cfg.session_id, prefix="ingest", metrics=self.metrics,
            clean_start=False, session_expiry=self.cfg.session_expiry, manual_ack=True,
            on_connected=self._subscribe, on_message=self._on_message,
        )

    def _subscribe(self, client: Any) -> None:
        client.subscribe(f"{TOPIC_ROOT}/+/+", qos=1)

    def _mine(self, msg: Any) -> bool:
        """Whether this worker stores the message; one without a readable device part
        goes to worker 0, which refuses and quarantines it once."""
        if self.cfg.workers == 1:
            return True
        try:
            device = _device_of(str(msg.topic))
        except Exception:  # not UTF-8: worker 0 refuses it
            device = None
        owner = 0 if device is None else partition_of(device, self.cfg.workers)
        return owner == self.cfg.worker

    def _on_message(self, client: Any, _ud: Any, msg: Any) -> None:
        """Validate one message alone; a refused one is queued for its ack and quarantine."""
        if not self._mine(msg):
            # Another worker's device: it gets the same message on its own session.
            self.skipped += 1
            if msg.qos:
                client.ack(int(msg.mid), int(msg.qos))
            return
        b = self._batch
        if not len(b):
            b.started = time.monotonic()
        key = (self.link.generation, int(msg.mid), int(msg.qos))
        received = time.time()
        payload, topic = b"", "?"
        try:
            payload = bytes(msg.payload)
            topic = str(msg.topic)  # paho decodes it lazily (mosquitto checks UTF-8)
            result = validate_message(topic, payload, self.cfg.max_payload_bytes,
                                      received=received, max_future_s=self.cfg.max_future_s,
                                      max_age_s=self.cfg.max_age_s)
        except Exception as exc:  # never leave a message unacknowledged
            result = Rejected("internal", f"{type(exc).__name__}: {exc}"[:200])
        if isinstance(result, Rejected):
            self._refuse(b, key, _Refused(_device_of(topic), topic, result.reason,
                                          result.detail, payload, received))
        else:
            b.items.append((*key, result))

    def _refuse(self, b: _Batch, key: tuple[int, int, int], r: _Refused) -> None:
        log.warning("rejected telemetry on %s: %s (%s)", r.topic[:120], r.reason, r.detail)
        self.metrics.inc(f"ingest_rejected_{r.reason}")
        self.rejected += 1
        b.rejects[r.reason] = b.rejects.get(r.reason, 0) + 1
        b.refused.append(r)
        b.reject_acks.append(key)

    # -- writing ----------------------------------------------------------------------------
    def _write(self, batch: _Batch, now: float) -> tuple[int, int]:
        """The batch in one transaction: all rows at once; if anything but an outage
        fails, again message by message, each in its own savepoint (slower, isolating).
        Its time is ``ingest_batch_commit_seconds``, whichever thread commits it."""
        t0 = time.perf_counter()
        try:
            return self._write_fast(batch, now)
        except Exception as exc:
            if _is_outage(exc):
                raise
            log.info("batch write failed (%s); writing message by message", exc)
            self.metrics.inc("ingest_batch_isolated")
            return self._write_isolated(batch, now)
        finally:
            self.metrics.observe("ingest_batch_commit_seconds", time.perf_counter() - t0,
                                 COMMIT_BUCKETS_S)

    def _write_fast(self, batch: _Batch, now: float) -> tuple[int, int]:
        per_device: dict[str, list[int]] = {}
        latest: dict[str, tuple[float, MetricsBody]] = {}
        envs = [acc for _g, _m, _q, acc in batch.items if acc.envelope is not None]
        with self.store.transaction() as st:
            fresh = st.insert_messages([
                (e.device, e.boot, e.seq, e.kind, e.ts, now, acc.text)
                for acc in envs for e in (acc.envelope,) if e is not None])
            for acc, is_new in zip(envs, fresh, strict=True):
                self._account(st, acc, is_new, per_device, latest)
            for _g, _m, _q, acc in batch.items:
                if acc.status is not None:
                    s = acc.status
                    st.set_status(s.device, s.state == "online", s.ts, s.boot)
            st.touch_devices([(d, now, n, k) for d, (n, k) in per_device.items()])
            newest = list(latest.items())
            changed = st.update_metrics_many([(d, ts, _registry_fields(b),
                                               b.model_dump_json())
                                              for d, (ts, b) in newest])
            moved = [(d, body) for (d, (_ts, body)), yes in zip(newest, changed, strict=True)
                     if yes]
            open_now = st.open_alert_kinds([d for d, _ in moved])
            for device, body in moved:
                check_metrics(st, device, body, now, self.cfg.alerts, open_now[device])
            self._write_refused(st, batch)
        return _sums(per_device)

    def _write_refused(self, st: Store, batch: _Batch) -> None:
        if batch.rejects:  # in one order, so concurrent workers never deadlock
            st.count_rejects(dict(sorted(batch.rejects.items())))
        for r in batch.refused:
            st.quarantine(r.received, r.device, r.topic, r.reason, r.detail, r.payload,
                          keep=self.cfg.quarantine_rows)

    def _write_isolated(self, batch: _Batch, now: float) -> tuple[int, int]:
        new = dup = 0
        per_device: dict[str, list[int]] = {}
        latest: dict[str, tuple[float, MetricsBody]] = {}
        with self.store.transaction() as st:
            for _g, _m, _q, acc in batch.items:
                try:
                    with st.savepoint():
                        n, d = self._write_one(st, acc, now, per_device, latest)
                except Exception as exc:
                    if _is_outage(exc):
                        raise
                    # This message alone: its writes are rolled back, the batch goes on.
                    log.exception("storing a message of %s failed; quarantined", acc.device)
                    batch.rejects["store_error"] = batch.rejects.get("store_error", 0) + 1
                    self.metrics.inc("ingest_rejected_store_error")
                    batch.store_errors += 1
                    batch.refused.append(_Refused(acc.device,
                                                  f"{TOPIC_ROOT}/{acc.device}/{acc.kind}",
                                                  "store_error",
                                                  f"{type(exc).__name__}: {exc}"[:200],
                                                  acc.text.encode(), now))
                    continue
                new += n
                dup += d
            for device, (n_new, n_dup) in per_device.items():
                st.touch_device(device, now, n_new, n_dup)
            for device, (ts, body) in latest.items():
                try:
                    with st.savepoint():
                        if st.update_metrics(device, ts, _registry_fields(body),
                                             body.model_dump_json()):
                            check_metrics(st, device, body, now, self.cfg.alerts)
                except Exception as exc:
                    if _is_outage(exc):
                        raise
                    log.exception("updating the registry row of %s failed", device)
                    self.metrics.inc("ingest_registry_errors")
            self._write_refused(st, batch)
        return new, dup

    @classmethod
    def _write_one(cls, st: Store, acc: Accepted, now: float,
                   per_device: dict[str, list[int]],
                   latest: dict[str, tuple[float, MetricsBody]]) -> tuple[int, int]:
        """One accepted message's writes: (new, duplicate)."""
        if acc.status is not None:
            s = acc.status
            st.set_status(s.device, s.state == "online", s.ts, s.boot)
            return 0, 0
        env = acc.envelope
        assert env is not None
        is_new = st.insert_message(env.device, env.boot, env.seq, env.kind, env.ts, now,
                                   acc.text)
        cls._account(st, acc, is_new, per_device, latest)
        return (1, 0) if is_new else (0, 1)

    @staticmethod
    def _account(st: Store, acc: Accepted, is_new: bool, per_device: dict[str, list[int]],
                 latest: dict[str, tuple[float, MetricsBody]]) -> None:
        """After a message's insert: count it; keep the newest metrics; store its event."""
        env = acc.envelope
        assert env is not None
        if not is_new:
            per_device.setdefault(env.device, [0, 0])[1] += 1
            return
        if acc.metrics is not None:
            prev = latest.get(env.device)
            if prev is None or env.ts >= prev[0]:
                latest[env.device] = (env.ts, acc.metrics)
        elif isinstance(env, Envelope) and env.kind == "event":
            kind = str(env.body.get("kind", "event"))[:64]
            st.add_event(env.ts, env.device, f"device.{kind}", "info",
                         str(env.body.get("message", kind))[:500], env.body)
        per_device.setdefault(env.device, [0, 0])[0] += 1

    def flush(self) -> None:
        """Commit the current batch, then PUBACK its messages (never before the commit);
        after the batch the writer thread may be committing."""
        self._reap(wait=True)
        batch, self._batch = self._batch, _Batch()
        if len(batch):
            self._finish(batch, *self._write(batch, time.time()))

    def _finish(self, batch: _Batch, new: int, dup: int) -> None:
        """After the batch's commit, on the network thread: count it and PUBACK it."""
        self.stored += new
        self.duplicates += dup
        self.rejected += batch.store_errors
        self.metrics.inc("ingest_stored", new)
        self.metrics.inc("ingest_duplicates", dup)
        client = self.link.client
        for gen, mid, qos in [(g, m, q) for g, m, q, _ in batch.items] + batch.reject_acks:
            # A PUBACK belongs to the connection that delivered the message; after a
            # reconnect the broker redelivers it and the store drops the duplicate.
            if qos and client is not None and gen == self.link.generation and self.link.connected:
                client.ack(mid, qos)

    def _hand_off(self) -> None:
        """Give the current batch to the writer thread; the next one starts filling."""
        assert self._writer is not None and self._inflight is None
        batch, self._batch = self._batch, _Batch()
        self._inflight = (batch, self._writer.submit(self._write, batch, time.time()))

    def _reap(self, *, wait: bool) -> None:
        """PUBACK the batch the writer has committed; re-raise what the writer raised
        (then nothing of that batch is acknowledged and the broker redelivers it)."""
        if self._inflight is None or not (wait or self._inflight[1].done()):
            return
        batch, fut = self._inflight
        self._inflight = None
        self._finish(batch, *fut.result())

    def step(self) -> None:
        """One round: network, then flush when the batch is full or old enough.

        Under :meth:`run` a batch is committed on the writer thread while this one
        keeps receiving and validating the next (the database's work, and psycopg's
        and sqlite3's waits, overlap paho's); a batch that comes due while the writer
        is busy keeps growing until it is free (up to ``_BACKLOG`` batches' worth)."""
        self.link.step(0.005 if self._inflight is not None else 0.02)
        self._reap(wait=False)
        b = self._batch
        if len(b) and (len(b) >= self.cfg.batch_size
                       or time.monotonic() - b.started >= self.cfg.batch_interval):
            if self._writer is None:
                self.flush()
            elif self._inflight is None:
                self._hand_off()
            elif len(b) >= _BACKLOG * self.cfg.batch_size:
                self._reap(wait=True)
                self._hand_off()
        now = time.time()
        if self.cfg.worker == 0 and now - self._last_silent_check >= self.cfg.silent_check_every:
            self._last_silent_check = now
            with self.store.transaction() as st:
                check_silent(st, now, self.cfg.alerts)

    def run(self) -> None:
        """Ingest until :meth:`stop`; store errors are logged, counted and retried."""
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="ingest-writer")
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                except Exception:
                    # Unacknowledged messages are redelivered after the reconnect below.
                    log.exception("ingest step failed; reconnecting")
                    self.metrics.inc("ingest_loop_errors")
                    self._batch = _Batch()
                    self.link.close()
                    self._abandon()
                    time.sleep(0.5)
            try:
                self.flush()
            finally:
                self.link.close()
        finally:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _abandon(self) -> None:
        """After the link closed: wait for the writer; what it committed is counted,
        never acknowledged on the closed connection (the broker redelivers it)."""
        try:
            self._reap(wait=True)
        except Exception:
            log.exception("the batch being written failed too; it will be redelivered")

    def stop(self) -> None:
        """Ask :meth:`run` to flush and return."""
        self._stop.set()


def _sums(per_device: dict[str, list[int]]) -> tuple[int, int]:
    """(new, duplicate) over all devices."""
    return (sum(n for n, _ in per_device.values()), sum(d for _, d in per_device.values()))


def _device_of(topic: str) -> str | None:
    """The device part of a telemetry topic (for the quarantine), if there is one."""
    parts = topic.split("/")
    return parts[2][:64] if len(parts) == 4 and parts[2] else None


def _is_outage(exc: BaseException) -> bool:
    """A database that cannot be written now (retry the batch), not a bad message."""
    return isinstance(exc, sqlite3.OperationalError) or (
        type(exc).__name__ == "OperationalError" and type(exc).__module__.startswith("psycopg"))


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
