"""Telemetry throughput: one device → mosquitto → store, with and without the disk spool,
and ingest throughput with 50 simulated devices. Writes docs/bench/telemetry.md.

    .venv/bin/python scripts/bench_telemetry.py [--messages 5000] [--devices 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import md_table, write_section  # type: ignore[import-not-found]

from edgefleet.device.core.metrics import CONFIDENCE_BUCKETS, Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.reporter import build_metrics_body
from edgefleet.device.telemetry.spool import MemorySpool, Spool
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.telemetry.ingest import IngestConfig, IngestService
from edgefleet.server.telemetry.store import open_store


def _body() -> dict[str, object]:
    m = Metrics()
    for i in range(200):
        m.inc("inferences")
        m.observe("inference_latency_ms", 0.3 + i % 7)
        m.observe("inference_confidence", (i % 10) / 10, CONFIDENCE_BUCKETS)
    return build_metrics_body(m)


def _wait_rows(store, n: int, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while store.message_stats()["rows"] < n:
        if time.monotonic() > end:
            raise RuntimeError("timed out waiting for the store")
        time.sleep(0.01)


class _Ingest:
    def __init__(self, store, port: int) -> None:  # type: ignore[no-untyped-def]
        self.svc = IngestService(store, IngestConfig(mqtt=MqttConfig(port=port)),
                                 metrics=Metrics())
        self.th = threading.Thread(target=self.svc.run, daemon=True)

    def __enter__(self) -> IngestService:
        self.th.start()
        while not self.svc.link.connected:
            time.sleep(0.01)
        time.sleep(0.3)
        return self.svc

    def __exit__(self, *exc: object) -> None:
        self.svc.stop()
        self.th.join(10)


def one_device(tmp: Path, port: int, n: int, spooled: bool, body: dict[str, object]) -> float:
    """Messages/s from the first publish until the last row is in the store."""
    store = open_store(tmp / f"fleet-{spooled}-{time.monotonic_ns()}.db")
    spool = Spool(tmp / f"spool-{time.monotonic_ns()}.db", max_messages=n + 1) if spooled \
        else MemorySpool(max_messages=n + 1)
    with _Ingest(store, port):
        pub = TelemetryPublisher("bench-dev", MqttConfig(port=port), spool,
                                 metrics=Metrics()).start()
        while not pub.link.connected:
            time.sleep(0.01)
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish("metrics", body)
        _wait_rows(store, n)
        rate = n / (time.perf_counter() - t0)
        pub.stop()
    store.close()
    return rate


def to_broker(tmp: Path, port: int, n: int, spooled: bool, body: dict[str, object]) -> float:
    """Messages/s from the first publish until the broker has PUBACKed the last one."""
    spool = Spool(tmp / f"spool-{time.monotonic_ns()}.db", max_messages=n + 1) if spooled \
        else MemorySpool(max_messages=n + 1)
    pub = TelemetryPublisher("bench-dev2", MqttConfig(port=port), spool,
                             metrics=Metrics()).start()
    while not pub.link.connected:
        time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(n):
        pub.publish("metrics", body)
    if not pub.drain(300):
        raise RuntimeError("spool did not drain")
    rate = n / (time.perf_counter() - t0)
    pub.stop()
    return rate


def fleet_ingest(tmp: Path, port: int, devices: int, per_device: int,
                 body: dict[str, object]) -> tuple[float, int]:
    """Ingest-only rate: the broker holds every device's messages, then the ingest drains."""
    store = open_store(tmp / "fleet-50.db")
    with _Ingest(store, port):
        pass  # registers the persistent session, then goes away
    pubs = [TelemetryPublisher(f"sim-{i:02d}", MqttConfig(port=port),
                               MemorySpool(max_messages=per_device + 1),
                               metrics=Metrics()).start() for i in range(devices)]
    for p in pubs:
        for _ in range(per_device):
            p.publish("metrics", body)
    for p in pubs:
        p.drain(300)
        p.stop()
    total = devices * per_device
    t0 = time.perf_counter()
    with _Ingest(store, port):
        _wait_rows(store, total)
    rate = total / (time.perf_counter() - t0)
    store.close()
    return rate, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--per-device", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    body = _body()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        broker = MosquittoBroker(tmp / "broker", BrokerConfig()).start()
        try:
            with_spool, without, b_spool, b_mem = [], [], [], []
            for _ in range(args.repeats):  # interleaved so load changes hit both
                without.append(one_device(tmp, broker.port, args.messages, False, body))
                with_spool.append(one_device(tmp, broker.port, args.messages, True, body))
                b_mem.append(to_broker(tmp, broker.port, args.messages, False, body))
                b_spool.append(to_broker(tmp, broker.port, args.messages, True, body))
            fleet_rate, total = fleet_ingest(tmp, broker.port, args.devices,
                                             args.per_device, body)
        finally:
            broker.kill()
    med_w, med_wo = statistics.median(with_spool), statistics.median(without)
    payload = len(__import__("json").dumps(body))
    bm, bs = statistics.median(b_mem), statistics.median(b_spool)
    rows = [
        ["device → broker PUBACK, in-memory queue (no spool)", f"{bm:,.0f}", "1.00"],
        ["device → broker PUBACK, SQLite WAL spool", f"{bs:,.0f}", f"{bm / bs:.2f}"],
        ["1 device → store, in-memory queue (no spool)", f"{med_wo:,.0f}", "1.00"],
        ["1 device → store, SQLite WAL spool", f"{med_w:,.0f}", f"{med_wo / med_w:.2f}"],
        [f"ingest only, {args.devices} devices ({total:,} queued msgs)", f"{fleet_rate:,.0f}",
         "-"],
    ]
    text = (
        f"Messages/s from the first publish until the last row is committed in the SQLite "
        f"store (QoS 1, mosquitto on loopback, metrics bodies of ~{payload} bytes, "
        f"{args.messages} messages, median of {args.repeats} interleaved runs). "
        "The spool cost is the no-spool rate divided by the spool rate (target ≤ 2x). "
        "The fleet row measures the ingest alone: 50 simulated devices' messages wait at "
        "the broker for the ingest's persistent session, then the ingest drains them.\n\n"
        + md_table(["path", "msgs/s", "spool cost (x)"], rows)
        + "\n\nAll runs: no spool " + ", ".join(f"{r:,.0f}" for r in without)
        + "; spool " + ", ".join(f"{r:,.0f}" for r in with_spool)
        + "; to broker without spool " + ", ".join(f"{r:,.0f}" for r in b_mem)
        + "; to broker with spool " + ", ".join(f"{r:,.0f}" for r in b_spool) + ".\n\n"
        "Through the store the ingest (one process, one SQLite writer) is the bottleneck "
        "on this 2-core machine, so the device-side spool cost hides in it; the PUBACK "
        "rows isolate the spool: each message is one committed INSERT before sending and "
        "one batched DELETE after its PUBACK.\n\n"
        "Command: `.venv/bin/python scripts/bench_telemetry.py`"
    )
    path = write_section("telemetry", "Telemetry: device → mosquitto → store", text)
    print(path.read_text())


if __name__ == "__main__":
    main()
