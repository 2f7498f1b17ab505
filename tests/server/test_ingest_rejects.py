"""Bad messages through a real mosquitto are refused by the ingest with a counted reason."""

from __future__ import annotations

import json
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
