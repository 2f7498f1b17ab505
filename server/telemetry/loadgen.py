"""``edgefleet loadgen``: N virtual devices sending real telemetry to the real broker.

Each virtual device is what a fleet device is on the wire: enrolled through the fleet's
own path (:func:`~edgefleet.server.fleet.enrollment.enroll_device`: its broker account
and ACL entry), its own MQTT 5 connection (:class:`MqttLink`, client id = user name =
device id, so the ACL's ``%u`` rules apply), a retained ``online`` status and an
``offline`` will, and :class:`~edgefleet.device.wire.telemetry.Envelope` messages
encoded by the wire module with ``(device, boot, seq)``. Like the device's publisher it
keeps every message until the broker's PUBACK and re-sends what is unacknowledged after
a reconnect, so a broker restart costs no message on the device side.

Many devices share a process: one loop steps every link without blocking (paho's
``loop(0)``), a few processes split the devices. The report counts what was sent,
acknowledged (and with which PUBACK reason: "no matching subscribers" means the broker
accepted a message nobody will read), stored (the store's rows for these boots) and the
difference: lost, and duplicated rows (which ``UNIQUE (device, boot, seq)`` forbids).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import resource
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.device.core.errors import EdgefleetError, UsageError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig, MqttLink, Will
from edgefleet.device.wire.telemetry import (
    SCHEMA_VERSION,
    Envelope,
    HistogramBody,
    MetricsBody,
    Status,
    encode,
    topic_for,
)
from edgefleet.server.telemetry.store import Store

__all__ = ["MAX_DEVICES_PER_PROCESS", "DeviceResult", "LoadConfig", "LoadError",
           "LoadReport", "VirtualDevice", "count_stored", "enroll_devices",
           "metrics_body_template", "run_load", "settle_store"]

log = logging.getLogger(__name__)

#: Devices one process drives: paho's ``loop()`` waits with ``select()``, which takes
#: descriptors below 1024, and each client holds three (its socket, a wake-up pair).
MAX_DEVICES_PER_PROCESS = 300

#: PUBACK reason "no matching subscribers" (MQTT 5): accepted, and delivered to nobody.
NO_MATCHING_SUBSCRIBERS = 16


@dataclass(frozen=True)
class VirtualDevice:
    """An enrolled device's broker identity (its bundle's user name and password)."""

    name: str
    password: str


@dataclass(frozen=True)
class LoadConfig:
    """What to send: ``messages`` per device at ``rate`` messages/s over all devices."""

    host: str
    port: int
    messages: int
    rate: float
    ca_file: Path | None = None
    #: Messages a device keeps in flight (the agent's publisher: 100).
    window: int = 20
    #: Give up on PUBACKs this long after the last message is due.
    drain_timeout: float = 120.0
    #: Every device must have connected once within this many seconds of its start.
    connect_timeout: float = 30.0


class LoadError(EdgefleetError):
    """The run could not happen as asked (devices refused, a process died)."""


@dataclass
class DeviceResult:
    """One device after the run: its boot, how far it counted, what the broker said."""

    name: str
    boot: str
    sent: int = 0
    acked: int = 0
    no_subscribers: int = 0
    refused: int = 0
    resent: int = 0
    connects: int = 0


@dataclass
class LoadReport:
    """The totals ``edgefleet loadgen`` prints."""

    devices: int
    sent: int = 0
    acked: int = 0
    no_subscribers: int = 0
    refused: int = 0
    resent: int = 0
    connects: int = 0
    unacked: int = 0
    seconds: float = 0.0
    stored: int | None = None
    lost: int | None = None
    duplicated: int | None = None
    deduplicated: int | None = None
    per_device: list[DeviceResult] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        """Everything but the per-device rows (for ``--json``)."""
        out = asdict(self)
        out.pop("per_device")
        out["rate"] = round(self.sent / self.seconds, 1) if self.seconds else 0.0
        return out


# -- enrollment -------------------------------------------------------------------------------
def enroll_devices(home: Any, n: int, prefix: str = "lg-", group: str = "loadgen", *,
                   progress: Callable[[int], None] | None = None) -> list[VirtualDevice]:
    """``n`` devices named ``<prefix>00000``...: enrolled now (the fleet's own enrollment,
    bundle under ``<home>/bundles``) or reused from an earlier run's bundles."""
    from edgefleet.server.fleet.enrollment import enroll_device

    out = []
    for i in range(n):
        name = f"{prefix}{i:05d}"
        bundle = home.root / "bundles" / name
        row = home.devices.get(name)
        if row is None or not row.active:
            if bundle.exists():
                raise UsageError(f"{bundle} is left from an earlier enrollment of {name}; "
                                 "delete it (or choose another --prefix)")
            bundle = enroll_device(home, name, group)
        elif not (bundle / "mqtt.password").is_file():
            raise UsageError(f"{name} is enrolled but its bundle is gone ({bundle}): "
                             f"revoke it (edgefleet devices revoke {name}) or use another "
                             "--prefix")
        out.append(VirtualDevice(name, (bundle / "mqtt.password").read_text().strip()))
        if progress is not None:
            progress(i + 1)
    return out


# -- one virtual device --------------------------------------------------------------------
def metrics_body_template() -> dict[str, Any]:
    """A metrics body of the size a Pi sends (~700 bytes), built from the wire's models
    (also what benchmarks fill a store with)."""
    hist = HistogramBody(count=200, p50=1.2, p95=3.4, p99=5.9,
                         bounds=[0.5, 1, 2, 5, 10, 20, 50, 100],
                         counts=[20, 60, 70, 40, 8, 2, 0, 0, 0], sum=310.5)
    conf = HistogramBody(count=200, bounds=[i / 10 for i in range(1, 10)],
                         counts=[0, 0, 1, 2, 4, 9, 20, 40, 60, 64], sum=161.0)
    return MetricsBody(
        inferences=0, local=0, fallback=0, degraded=0, latency_ms=hist, confidence=conf,
        drift={"input_psi": 0.02, "input_psi_max": 0.05, "confidence_psi": 0.01,
               "window": 500},
        model={"name": "digits", "version": "1.0.0", "variant": "int8"},
        training={"state": "idle", "epsilon": 0.0},
        system={"cpu_percent": 12.5, "load1": 0.4, "mem_total_mb": 3792,
                "mem_used_mb": 410, "rss_mb": 61.2, "temperature_c": 48.3,
                "uptime_s": 86400, "process_uptime_s": 3600},
        spool={"pending": 0, "dropped": 0, "bytes": 0},
        counters={"telemetry_published": 0, "input_errors": 0},
    ).model_dump(mode="json", exclude_none=True)


class _Device:
    """One virtual device: an MqttLink, a boot, a counter and the unacknowledged messages."""

    def __init__(self, dev: VirtualDevice, cfg: LoadConfig, metrics: Metrics,
                 body: dict[str, Any]) -> None:
        self.name = dev.name
        self.cfg = cfg
        self.boot = secrets.token_hex(8)
        self.result = DeviceResult(dev.name, self.boot)
        self.body = body
        self.unacked: dict[int, bytes] = {}
        self.inflight: dict[int, int] = {}  # paho mid -> seq
        self.queue: deque[int] = deque()  # seqs to send on this connection
        self.generation = 0
        self.topic = topic_for(dev.name, "metrics")
        offline = Status(v=SCHEMA_VERSION, device=dev.name, boot=self.boot,
                         state="offline", ts=time.time())
        mqtt = MqttConfig(host=cfg.host, port=cfg.port, username=dev.name,
                          password=dev.password, ca_file=cfg.ca_file, backoff_base=0.2,
                          backoff_cap=5.0)
        self.link = MqttLink(mqtt, dev.name, prefix="loadgen", metrics=metrics,
                             will=Will(topic_for(dev.name, "status"), encode(offline)),
                             on_connected=self._connected, on_publish=self._published)

    def produce(self) -> None:
        r = self.result
        r.sent += 1
        self.body["inferences"] = self.body["local"] = r.sent * 10
        env = Envelope(v=SCHEMA_VERSION, device=self.name, boot=self.boot, seq=r.sent,
                       ts=time.time(), kind="metrics", body=self.body)
        self.unacked[r.sent] = encode(env)
        self.queue.append(r.sent)

    def _connected(self, client: Any) -> None:
        online = Status(v=SCHEMA_VERSION, device=self.name, boot=self.boot, state="online",
                        ts=time.time())
        client.publish(topic_for(self.name, "status"), encode(online), qos=1, retain=True)
        self.result.connects += 1

    def fill(self) -> None:
        """Keep ``window`` messages in flight; after a reconnect, everything unacked again."""
        if self.link.generation != self.generation:
            self.generation = self.link.generation
            if self.inflight:
                self.result.resent += len(self.inflight)
            self.inflight.clear()
            self.queue = deque(sorted(self.unacked))
        client = self.link.client
        while self.queue and len(self.inflight) < self.cfg.window:
            seq = self.queue.popleft()
            info = client.publish(self.topic, self.unacked[seq], qos=1)
            if info.rc != 0:
                self.queue.appendleft(seq)
                break
            self.inflight[info.mid] = seq

    def _published(self, _client: Any, _ud: Any, mid: int, rc: Any, _props: Any) -> None:
        seq = self.inflight.pop(mid, None)
        if seq is None:
            return  # the status message
        self.unacked.pop(seq, None)
        if rc.is_failure:  # e.g. not authorized: the real publisher drops it too
            self.result.refused += 1
            return
        self.result.acked += 1
        if getattr(rc, "value", rc) == NO_MATCHING_SUBSCRIBERS:
            self.result.no_subscribers += 1

    @property
    def done(self) -> bool:
        return self.result.sent >= self.cfg.messages and not self.unacked


def _raise_fd_limit() -> None:
    """paho needs three descriptors per client (socket and a wake-up pair)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _connect_all(devs: Sequence[_Device], cfg: LoadConfig, metrics: Metrics) -> None:
    """Connect every device once before the clock starts, or say why not."""
    deadline = time.monotonic() + cfg.connect_timeout
    while not all(d.result.connects for d in devs):
        for d in devs:
            d.link.safe_step(0)
        if time.monotonic() > deadline:
            missing = sum(1 for d in devs if not d.result.connects)
            auth = metrics.counter("loadgen_connect_refused_auth")
            hint = (f"; {auth} connection attempts refused as not authorized: reload the "
                    "broker (SIGHUP, or `edgefleet server up` does it) after enrolling"
                    if auth else "")
            raise LoadError(f"{missing} of {len(devs)} devices did not connect to "
                            f"{cfg.host}:{cfg.port} within {cfg.connect_timeout:g} s{hint}")
        time.sleep(0.005)


def _run_share(devices: Sequence[VirtualDevice], cfg: LoadConfig, total_devices: int,
               barrier: Any, counters: Any) -> list[DeviceResult]:
    """One process's devices until each has sent ``messages`` and seen their PUBACKs."""
    _raise_fd_limit()
    metrics = Metrics()
    template = metrics_body_template()
    devs = [_Device(d, cfg, metrics, dict(template)) for d in devices]
    per_device = cfg.rate / total_devices  # messages/s of one device
    offsets = [random.uniform(0, 1 / per_device) for _ in devs]  # no lockstep
    try:
        _connect_all(devs, cfg, metrics)
    except LoadError:
        barrier.abort()
        raise
    barrier.wait(cfg.connect_timeout * 2)  # every process starts the clock together
    t0 = time.monotonic()
    last_due = t0 + max(offsets, default=0) + (cfg.messages - 1) / per_device
    reported = (0, 0)
    while True:
        now = time.monotonic()
        for d, off in zip(devs, offsets, strict=True):
            due = min(cfg.messages, int((now - t0 - off) * per_device) + 1) if now >= t0 + off \
                else 0
            while d.result.sent < due:
                d.produce()
            if d.link.connected:
                d.fill()
            d.link.safe_step(0)
        sent = sum(d.result.sent for d in devs)
        acked = sum(d.result.acked + d.result.refused for d in devs)
        if all(d.done for d in devs) or now > last_due + cfg.drain_timeout:
            break
        if (sent, acked) == reported:
            time.sleep(0.001)  # nothing moved: leave the CPU to the broker and the ingest
            continue
        with counters.get_lock():
            counters[0] += sent - reported[0]
            counters[1] += acked - reported[1]
        reported = (sent, acked)
    for d in devs:
        d.link.close()
    return [d.result for d in devs]


def _share_main(devices: list[VirtualDevice], cfg: LoadConfig, total: int, barrier: Any,
                counters: Any, results: Any) -> None:
    """Entry point of a load process: its results (or its error) go back through
    ``results``."""
    logging.basicConfig(level=logging.ERROR)
    try:
        results.put(_run_share(devices, cfg, total, barrier, counters))
    except threading.BrokenBarrierError:  # another process failed: its error says why
        results.put(_Aborted("a load process stopped because another one failed"))
    except BaseException as exc:  # reported by the parent, never a traceback per process
        results.put(LoadError(str(exc) or type(exc).__name__))


class _Aborted(LoadError):
    """A load process that stopped because another one failed (whose error is reported
    instead, whichever of the two reaches the parent first)."""


def run_load(devices: Sequence[VirtualDevice], cfg: LoadConfig, *, processes: int = 1,
             progress: Callable[[int, int], None] | None = None) -> LoadReport:
    """Drive ``devices`` from ``processes`` processes; ``progress(sent, acked)`` is called
    while they run. Returns the device-side counts (see :func:`count_stored`)."""
    if not devices:
        raise UsageError("no devices to drive")
    if cfg.rate <= 0 or cfg.messages < 1:
        raise UsageError("rate must be > 0 and messages ≥ 1")
    processes = max(1, min(processes, len(devices)))
    if -(-len(devices) // processes) > MAX_DEVICES_PER_PROCESS:
        raise UsageError(f"at most {MAX_DEVICES_PER_PROCESS} devices per process (paho "
                         f"waits with select()): use --processes "
                         f"{-(-len(devices) // MAX_DEVICES_PER_PROCESS)} or more")
    ctx = mp.get_context("spawn")
    counters = ctx.Array("q", 2)
    results = ctx.Queue()
    shares = [list(devices[i::processes]) for i in range(processes)]
    barrier = ctx.Barrier(processes)
    procs = [ctx.Process(target=_share_main, name=f"loadgen-{i}",
                         args=(share, cfg, len(devices), barrier, counters, results),
                         daemon=True) for i, share in enumerate(shares)]
    for p in procs:
        p.start()
    report = LoadReport(devices=len(devices))
    got: list[DeviceResult] = []
    pending = len(procs)
    started: float | None = None
    aborted: _Aborted | None = None
    try:
        while pending:
            try:
                item = results.get(timeout=0.2)
            except Exception:  # queue.Empty
                item = None
                if not any(p.is_alive() for p in procs) and results.empty():
                    raise LoadError("a load process died without a result") from None
            if isinstance(item, _Aborted):
                aborted, item = item, []
            elif isinstance(item, BaseException):
                raise item
            if started is None and counters[0]:
                started = time.time()
            if item is not None:
                got += item
                pending -= 1
            if progress is not None:
                progress(int(counters[0]), int(counters[1]))
        if aborted is not None:
            raise aborted
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    report.seconds = max(time.time() - (started or time.time()), 1e-9)
    report.per_device = sorted(got, key=lambda r: r.name)
    for r in report.per_device:
        report.sent += r.sent
        report.acked += r.acked
        report.no_subscribers += r.no_subscribers
        report.refused += r.refused
        report.resent += r.resent
        report.connects += r.connects
    report.unacked = report.sent - report.acked - report.refused
    return report


# -- what reached the store ---------------------------------------------------------------
def count_stored(store: Store, report: LoadReport) -> tuple[int, int, int]:
    """``(distinct stored, duplicate rows, deduplicated)`` of this run's boots: rows with
    the devices' (device, boot), distinct seqs among them, and the redeliveries the
    ingest dropped (the store's per-device ``duplicates``, summed over the devices)."""
    if not report.per_device:
        return 0, 0, 0
    boots = {(r.name, r.boot) for r in report.per_device}
    names = sorted(r.name for r in report.per_device)
    rows = store.query(
        "SELECT device, boot, COUNT(*), COUNT(DISTINCT seq) FROM messages "
        "WHERE device >= ? AND device <= ? GROUP BY device, boot", (names[0], names[-1]))
    distinct = dup = 0
    for device, boot, n, d in rows:
        if (device, boot) in boots:
            distinct += int(d)
            dup += int(n) - int(d)
    dedup = store.query("SELECT COALESCE(SUM(duplicates), 0) FROM devices "
                        "WHERE device >= ? AND device <= ?", (names[0], names[-1]))
    return distinct, dup, int(dedup[0][0])


def settle_store(store: Store, report: LoadReport, timeout: float, *,
           progress: Callable[[int], None] | None = None) -> LoadReport:
    """Wait (up to ``timeout`` s) until every acknowledged message is in the store, then
    fill in stored, lost, duplicated and deduplicated."""
    end = time.monotonic() + timeout
    while True:
        stored, dup, dedup = count_stored(store, report)
        if progress is not None:
            progress(stored)
        if stored >= report.sent or time.monotonic() > end:
            break
        time.sleep(0.2)
    report.stored, report.duplicated, report.deduplicated = stored, dup, dedup
    report.lost = report.sent - stored
    return report
