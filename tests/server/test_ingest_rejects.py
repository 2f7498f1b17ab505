"""Bad messages through a real mosquitto are refused by the ingest with a counted reason."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.server.telemetry.store import open_store
from tests.support.telemetry import raw_client, running_ingest, wait_until


def _env(device: str, seq: int, **over: object) -> bytes:
    base = {"v": 1, "device": device, "boot": "ab" * 8, "seq": seq, "ts": time.time(),
            "kind": "metrics", "body": {"inferences": 100, "fallback": 60,
                                        "drift": {"input_psi": 0.9}}}
    base.update(over)
    return json.dumps(base).encode()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_ingest_rejects_and_survives(mosquitto, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = open_store(tmp_path / "fleet.db")
    m = Metrics()
    with running_ingest(store, mosquitto.port, metrics=m) as ing:
        c = raw_client(mosquitto.port, "tester")
        try:
            bad = [
                ("edgefleet/v1/d1/metrics", b"{oops"),
                ("edgefleet/v1/d1/metrics", _env("d1", 1, v=7)),
                ("edgefleet/v1/d1/metrics", b"{" + b" " * 70_000 + b"}"),
                ("edgefleet/v1/d1/metrics", _env("d2", 1)),  # d2's report on d1's topic
                ("edgefleet/v1/d1/metrics", _env("d1", -5)),
            ]
            for topic, payload in bad:
                c.publish(topic, payload, qos=1).wait_for_publish(5)
            c.publish("edgefleet/v1/d1/metrics", _env("d1", 1), qos=1).wait_for_publish(5)
            c.publish("edgefleet/v1/d1/metrics", _env("d1", 1), qos=1).wait_for_publish(5)
        finally:
            c.loop_stop()
            c.disconnect()
        assert wait_until(lambda: sum(store.rejects().values()) == 5 and ing.stored == 1, 10)
        assert wait_until(lambda: ing.duplicates == 1, 5)
    assert store.rejects() == {"malformed": 1, "unknown_schema": 1, "oversized": 1,
                               "device_mismatch": 1, "invalid": 1}
    for reason in ("malformed", "unknown_schema", "oversized", "device_mismatch", "invalid"):
        assert m.counter(f"ingest_rejected_{reason}") == 1
    assert store.message_stats() == {"rows": 1, "distinct": 1}
    d = store.device("d1")
    assert d is not None and d["n_fallback"] == 60 and d["duplicates"] == 1
    kinds = {e["kind"] for e in store.events()}
    assert {"alert.drift", "alert.fallback_rate"} <= kinds


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_message_failing_in_the_store_is_rolled_back_alone(  # type: ignore[no-untyped-def]
        mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that passes validation but fails inside the store transaction is rolled
    back to its savepoint, acknowledged and quarantined; the batch's others are stored."""
    store = open_store(tmp_path / "fleet.db")
    real_add_event = store.add_event

    def add_event(ts: float, device: str | None, *a: object, **k: object) -> None:
        if device == "evil":
            raise ValueError("cannot store this one")
        real_add_event(ts, device, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "add_event", add_event)
    m = Metrics()
    with running_ingest(store, mosquitto.port, metrics=m, batch_interval=0.5) as ing:
        c = raw_client(mosquitto.port, "tester")
        try:
            for seq in range(1, 21):  # one batch: good and failing messages interleaved
                for dev in ("d1", "evil", "d2"):
                    c.publish(f"edgefleet/v1/{dev}/event",
                              _env(dev, seq, kind="event", body={"kind": "tick"}), qos=1)
            c.publish("edgefleet/v1/d1/event", _env("d1", 99, kind="event",
                                                    body={"kind": "last"}),
                      qos=1).wait_for_publish(5)
        finally:
            c.loop_stop()
            c.disconnect()
        assert wait_until(lambda: ing.stored == 41 and ing.rejected == 20, 15), \
            (ing.stored, ing.rejected)
    assert store.message_stats("d1")["rows"] == 21 and store.message_stats("d2")["rows"] == 20
    assert store.message_stats("evil")["rows"] == 0  # rolled back to its savepoint
    assert store.rejects() == {"store_error": 20}
    q = store.quarantined(device="evil", limit=100)
    assert len(q) == 20 and {r["reason"] for r in q} == {"store_error"}
    assert m.counter("ingest_loop_errors") == 0
    assert m.counter("ingest_batch_isolated") >= 1  # the all-at-once write fell back
    assert store.device("evil") is None or store.device("evil")["messages"] == 0  # type: ignore[index]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_failed_commit_on_the_writer_thread_is_redelivered_not_acknowledged(  # type: ignore[no-untyped-def]
        mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches commit on the writer thread while the next one fills: a database outage
    there acknowledges nothing of the batch; after the reconnect the broker redelivers
    it and every message is stored once."""
    store = open_store(tmp_path / "fleet.db")
    real_insert = store.insert_messages
    failures = [2]

    def insert_messages(rows: list[tuple[str, str, int, str, float, float, str]]
                        ) -> list[bool]:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real_insert(rows)

    monkeypatch.setattr(store, "insert_messages", insert_messages)
    m = Metrics()
    with running_ingest(store, mosquitto.port, metrics=m, batch_interval=0.02,
                        batch_size=10) as ing:
        c = raw_client(mosquitto.port, "tester")
        try:
            for seq in range(1, 61):
                c.publish("edgefleet/v1/d1/metrics", _env("d1", seq), qos=1)
            c.publish("edgefleet/v1/d1/metrics", _env("d1", 61), qos=1).wait_for_publish(5)
        finally:
            c.loop_stop()
            c.disconnect()
        assert wait_until(lambda: store.message_stats("d1")["distinct"] == 61, 20), \
            store.message_stats("d1")
    assert failures == [0] and m.counter("ingest_loop_errors") >= 1
    assert store.message_stats("d1") == {"rows": 61, "distinct": 61}
    assert ing.stored == 61 and ing.rejected == 0


def test_quarantine_is_bounded(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    with store.transaction() as st:
        for i in range(30):
            st.quarantine(float(i), "d1", "edgefleet/v1/d1/event", "too_deep", "x",
                          b"\x00\xff" + b"[" * 1000, keep=10)
    rows = store.quarantined(limit=100)
    assert len(rows) == 10 and rows[0]["received"] == 29.0 and rows[-1]["received"] == 20.0
    assert rows[0]["prefix"].startswith("\\x00\\xff[[") and rows[0]["size"] == 1002
    assert len(rows[0]["prefix"]) < 300
