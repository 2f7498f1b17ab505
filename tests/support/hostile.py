"""One hostile device among good ones, through a real mosquitto with enrolled credentials.

:func:`telemetry_scenario` is shared by ``tests/e2e/test_hostile_inputs.py`` and
``scripts/bench_hostile.py``: good devices publish sequence-numbered telemetry through
their real spools and publishers while one enrolled device sends every hostile class
(:func:`hostile_telemetry`) on its own topics, and a forged message on another device's
topic, which the broker ACL drops. It returns what was tried, refused and delivered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.broker import free_port
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.telemetry.store import Store, open_store
from tests.conftest import BIN
from tests.support.enroll import device_password, home_broker
from tests.support.telemetry import raw_client, running_ingest, wait_until

BOOT = "e0" * 8
#: Deep enough that a naive ``json.loads`` raises RecursionError (limit 1000 frames),
#: small enough (40 KB) to pass every size limit.
RECURSION_DEPTH = 20_000


def _env(device: str, seq: int, body: Any = None, ts: Any = None, **over: Any) -> dict[str, Any]:
    env = {"v": 1, "device": device, "boot": BOOT, "seq": seq,
           "ts": time.time() if ts is None else ts, "kind": "event",
           "body": body if body is not None else {"kind": "tick"}}
    env.update(over)
    return env


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile_telemetry(device: str, victim: str) -> list[tuple[str, bytes, str]]:
    """(class, payload, expected reason) for every hostile class, sent on ``device``'s
    own event topic."""
    deep = json.dumps(_env(device, 1)).encode().replace(b'{"kind": "tick"}',
                                                         b'{"kind": "x", "a": '
                                                         + _nested(300) + b"}")
    deeper = json.dumps(_env(device, 2)).encode().replace(b'{"kind": "tick"}',
                                                           b'{"kind": "x", "a": '
                                                           + _nested(RECURSION_DEPTH) + b"}")
    huge = json.dumps(_env(device, 3, {"kind": "x", "pad": "A" * 100_000})).encode()
    nan = json.dumps(_env(device, 4, {"kind": "x", "v": float("nan")})).encode()
    inf = json.dumps(_env(device, 5, {"kind": "x", "v": float("-inf")})).encode()
    inf_ts = json.dumps(_env(device, 6, ts=float("inf"))).encode()
    future = json.dumps(_env(device, 7, ts=time.time() + 10 * 365 * 86400)).encode()
    forged = json.dumps(_env(victim, 10_000)).encode()
    return [("deep nesting (300 levels)", deep, "too_deep"),
            (f"deep nesting ({RECURSION_DEPTH} levels, RecursionError in json.loads)",
             deeper, "too_deep"),
            ("huge message (100 KB)", huge, "oversized"),
            ("NaN number", nan, "non_finite"),
            ("-Infinity number", inf, "non_finite"),
            ("Infinity timestamp", inf_ts, "non_finite"),
            ("timestamp 10 years ahead", future, "clock_skew"),
            ("payload claiming another device", forged, "device_mismatch")]


@dataclass
class ScenarioResult:
    """What a scenario tried and what the store and the ingest saw."""

    good_sent: dict[str, int] = field(default_factory=dict)
    good_stored: dict[str, list[int]] = field(default_factory=dict)
    good_rows: dict[str, dict[str, int]] = field(default_factory=dict)
    hostile_sent: int = 0
    hostile_classes: list[tuple[str, str]] = field(default_factory=list)
    rejects: dict[str, int] = field(default_factory=dict)
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    evil_rows: int = 0
    forged_on_victim_topic: int = 0
    victim_rows_with_forged_seq: int = 0
    ingest_loop_errors: int = 0
    ingest_rejected: int = 0
    seconds: float = 0.0


class _IngestProcess:
    """``edgefleet ingest run --json`` as a real process; :attr:`counts` after the block."""

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {}


@contextlib.contextmanager
def ingest_process(db: Path, port: int, username: str, password: str
                   ) -> Iterator[_IngestProcess]:
    """Run the ingest CLI for the block; SIGTERM it after, keeping its JSON counts."""
    out = _IngestProcess()
    proc = subprocess.Popen([str(BIN / "edgefleet"), "ingest", "run", "--db", str(db),
                             "--port", str(port), "--username", username, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "EDGEFLEET_MQTT_PASSWORD": password})
    try:
        yield out
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        if proc.returncode != 0:
            raise AssertionError(f"ingest exited {proc.returncode}: {stderr[-2000:]}")
        out.counts = json.loads(stdout)


def telemetry_scenario(workdir: Path, *, good_devices: int = 3, per_device: int = 200,
                       rounds: int = 3, process: bool = False) -> ScenarioResult:
    """Run the scenario; the broker and ingest are stopped before returning.

    ``process``: the ingest is ``edgefleet ingest run`` as a real process (else an
    :class:`IngestService` thread in this process)."""
    home = FleetHome.create(workdir / "home", broker_port=free_port())
    broker = home_broker(home, workdir / "broker")
    out = ScenarioResult()
    pubs: list[TelemetryPublisher] = []
    try:
        names = [f"good-{i}" for i in range(good_devices)]
        pw = {n: device_password(enroll_device(home, n, out=workdir / n, broker=broker))
              for n in [*names, "evil"]}
        store = open_store(workdir / "fleet.db")
        ing_cred = home.service_credentials("ingest")
        m = Metrics()
        t0 = time.monotonic()
        if process:
            proc_ctx: Any = ingest_process(workdir / "fleet.db", broker.port,
                                           ing_cred.username, ing_cred.password)
        else:
            proc_ctx = running_ingest(store, broker.port, metrics=m,
                                      username=ing_cred.username, password=ing_cred.password)
        with proc_ctx as ing:
            if process and not _wait_subscribed(broker.port, pw["evil"], store):
                raise AssertionError("the ingest process never subscribed")
            for n in names:
                cfg = MqttConfig(port=broker.port, username=n, password=pw[n],
                                 backoff_base=0.05, backoff_cap=0.5)
                pubs.append(TelemetryPublisher(n, cfg, Spool(workdir / f"{n}.spool"),
                                               metrics=Metrics()).start())

            def produce(pub: TelemetryPublisher) -> None:
                for i in range(per_device):
                    pub.publish("event", {"kind": "tick", "i": i})
                    if i % 20 == 0:
                        time.sleep(0.01)

            threads = [threading.Thread(target=produce, args=(p,), daemon=True) for p in pubs]
            for t in threads:
                t.start()
            evil = raw_client(broker.port, "evil-raw", "evil", pw["evil"])
            try:
                hostile = hostile_telemetry("evil", names[0])
                out.hostile_classes = [(c, r) for c, _, r in hostile]
                for _ in range(rounds):
                    for _cls, payload, _r in hostile:
                        evil.publish("edgefleet/v1/evil/event", payload,
                                     qos=1).wait_for_publish(10)
                        out.hostile_sent += 1
                    # the ACL drops a message on the victim's own topic (never delivered)
                    evil.publish(f"edgefleet/v1/{names[0]}/event",
                                 json.dumps(_env(names[0], 10_001)).encode(),
                                 qos=1).wait_for_publish(10)
                    out.forged_on_victim_topic += 1
                    time.sleep(0.05)
                # the hostile device is not blocked: its own valid message is stored
                evil.publish("edgefleet/v1/evil/event", json.dumps(_env("evil", 99)).encode(),
                             qos=1).wait_for_publish(10)
            finally:
                evil.loop_stop()
                evil.disconnect()
            for t in threads:
                t.join(60)
            for p in pubs:
                p.drain(60)
            want = good_devices * per_device + 1
            wait_until(lambda: store.message_stats()["rows"] >= want
                       and sum(store.rejects().values()) >= out.hostile_sent, 60)
            time.sleep(0.5)  # a late duplicate would show up as a row now
            out.seconds = time.monotonic() - t0
            for p in pubs:
                out.good_sent[p.device_id] = per_device
                out.good_stored[p.device_id] = sorted(
                    r["seq"] for r in store.messages(device=p.device_id, limit=10 * per_device)
                    if r["boot"] == p.boot_id)
                out.good_rows[p.device_id] = store.message_stats(p.device_id)
            out.victim_rows_with_forged_seq = sum(
                1 for r in store.messages(device=names[0], limit=10 * per_device)
                if r["seq"] >= 10_000)
            out.rejects = store.rejects()
            out.quarantined = store.quarantined(limit=10_000)
            out.evil_rows = store.message_stats("evil")["rows"]
            if not process:
                out.ingest_loop_errors = m.counter("ingest_loop_errors")
                out.ingest_rejected = ing.rejected
        if process:
            out.ingest_loop_errors = int(ing.counts["counters"].get("ingest_loop_errors", 0))
            out.ingest_rejected = int(ing.counts["rejected"])
        store.close()
    finally:
        for p in pubs:
            p.stop()
        broker.kill()
    return out


def _wait_subscribed(port: int, password: str, store: Store) -> bool:
    """Whether a freshly started ingest process receives: the hostile device's (valid)
    status message, re-sent until its registry row appears (no message row, no reject)."""
    c = raw_client(port, "evil-probe", "evil", password)
    try:
        status = {"v": 1, "device": "evil", "boot": BOOT, "state": "online"}
        end = time.monotonic() + 30
        while time.monotonic() < end:
            c.publish("edgefleet/v1/evil/status", json.dumps({**status, "ts": time.time()}),
                      qos=1).wait_for_publish(10)
            if wait_until(lambda: store.device("evil") is not None, 0.5):
                return True
        return False
    finally:
        c.loop_stop()
        c.disconnect()
