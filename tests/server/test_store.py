"""The fleet store on SQLite and on a real PostgreSQL: migrations, dedupe, registry."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.wire.telemetry import MetricsBody
from edgefleet.server.telemetry.alerts import AlertThresholds, check_metrics, check_silent
from edgefleet.server.telemetry.store import MIGRATIONS, Store, open_store


def test_exactly_once_and_registry(store: Store) -> None:
    with store.transaction() as st:
        assert st.insert_message("d1", "b" * 16, 1, "event", 1.0, 10.0, "{}")
        assert not st.insert_message("d1", "b" * 16, 1, "event", 1.0, 11.0, "{}")
        assert st.insert_message("d1", "c" * 16, 1, "event", 1.0, 11.0, "{}")  # new boot
        st.touch_device("d1", 11.0, 2, 1)
        st.set_status("d1", True, 11.0, "c" * 16)
        st.update_metrics("d1", 5.0, {"n_inferences": 10, "model_version": "1.0.0"}, {"a": 1})
        # an older spooled report does not overwrite a newer one
        assert not st.update_metrics("d1", 4.0, {"n_inferences": 3}, {"a": 0})
        st.count_rejects({"malformed": 2})
        st.count_rejects({"malformed": 1, "oversized": 1})
    assert store.message_stats() == {"rows": 2, "distinct": 2}
    d = store.device("d1")
    assert d is not None
    assert (d["online"], d["messages"], d["duplicates"], d["n_inferences"]) == (1, 2, 1, 10)
    assert d["last_metrics"] == {"a": 1}
    assert store.rejects() == {"malformed": 3, "oversized": 1}
    assert [m["boot"] for m in store.messages(device="d1")] == ["b" * 16, "c" * 16]


def test_alerts_raise_once_and_resolve(store: Store) -> None:
    th = AlertThresholds(drift_psi=0.2, fallback_rate=0.3, min_inferences=10, silent_after=60)
    bad = MetricsBody(inferences=100, fallback=50, drift={"input_psi": 0.5})
    good = MetricsBody(inferences=200, fallback=10, drift={"input_psi": 0.01})
    with store.transaction() as st:
        st.touch_device("d1", 100.0, 1, 0)
        check_metrics(st, "d1", bad, 100.0, th)
        check_metrics(st, "d1", bad, 101.0, th)  # still bad: no second event
    kinds = sorted(e["kind"] for e in store.events())
    assert kinds == ["alert.drift", "alert.fallback_rate"]
    with store.transaction() as st:
        check_metrics(st, "d1", good, 102.0, th)
        check_silent(st, 1000.0, th)
    kinds = [e["kind"] for e in store.events()]
    assert "resolved.drift" in kinds and "resolved.fallback_rate" in kinds
    assert "alert.silent" in kinds
    assert [a["kind"] for a in store.open_alerts()] == ["silent"]
    with store.transaction() as st:
        check_silent(st, 1001.0, th)  # still silent: no second event
        st.touch_device("d1", 1002.0, 1, 0)
        check_silent(st, 1003.0, th)  # heard from again: resolved once
    kinds = [e["kind"] for e in store.events()]
    assert kinds.count("alert.silent") == 1 and kinds.count("resolved.silent") == 1
    assert store.open_alerts() == []


def test_alerts_with_open_kinds_read_once_per_batch(store: Store) -> None:
    """What the ingest does: the batch's open alerts in one query, then no statement for
    a device whose alerts do not change; the same events as reading nothing first."""
    th = AlertThresholds(drift_psi=0.2, fallback_rate=0.3, min_inferences=10)
    bad = MetricsBody(inferences=100, fallback=50, drift={"input_psi": 0.5})
    good = MetricsBody(inferences=200, fallback=10, drift={"input_psi": 0.01})
    with store.transaction() as st:
        assert st.open_alert_kinds([]) == {}
        open_now = st.open_alert_kinds(["a1", "a2"])
        assert open_now == {"a1": set(), "a2": set()}
        check_metrics(st, "a1", bad, 100.0, th, open_now["a1"])
        check_metrics(st, "a2", good, 100.0, th, open_now["a2"])  # nothing open: no events
    with store.transaction() as st:
        open_now = st.open_alert_kinds(["a1", "a2"])
        assert open_now == {"a1": {"drift", "fallback_rate"}, "a2": set()}
        check_metrics(st, "a1", bad, 101.0, th, open_now["a1"])  # still bad: no event
    assert sorted(e["kind"] for e in store.events()) == ["alert.drift", "alert.fallback_rate"]
    with store.transaction() as st:
        check_metrics(st, "a1", good, 102.0, th, st.open_alert_kinds(["a1"])["a1"])
    assert sorted(e["kind"] for e in store.events())[-2:] == ["resolved.drift",
                                                               "resolved.fallback_rate"]
    assert store.open_alerts() == []


def test_batched_insert_over_chunks_keeps_order_and_finds_duplicates(store: Store) -> None:
    """More rows than one statement takes; rows stored before count as duplicates."""
    rows = [("c1", "ab" * 8, i, "metrics", float(i), 2.0, f'{{"n": {i}}}')
            for i in range(1, 2502)]
    with store.transaction() as st:
        assert st.insert_messages(rows[:10]) == [True] * 10
    with store.transaction() as st:
        assert st.insert_messages(rows + rows[-1:]) == [False] * 10 + [True] * 2491 + [False]
    assert store.message_stats() == {"rows": 2501, "distinct": 2501}
    stored = store.messages(device="c1", limit=3000)
    assert [m["seq"] for m in stored] == list(range(1, 2502))  # ids follow the batch
    assert stored[5]["payload"] == '{"n": 6}'


def test_reopen_keeps_schema_and_refuses_newer(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    open_store(path).close()
    assert open_store(path).migrate() == len(MIGRATIONS)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (len(MIGRATIONS) + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(EdgefleetError, match="newer than this edgefleet"):
        open_store(path)


def test_drift_verdict_needs_the_threshold_and_the_noise_level() -> None:
    from edgefleet.server.telemetry.alerts import drift_verdict

    assert drift_verdict(None, 0.25) is None
    assert drift_verdict({"window": 20, "input_psi": None}, 0.25) is None
    # An older agent sends no noise level: the threshold alone decides.
    v = drift_verdict({"input_psi": 0.3, "confidence_psi": 0.1}, 0.25)
    assert v is not None and v.firing and v.score == "input_psi" and v.bar == 0.25
    # A short window: 0.3 is within what noise reaches there.
    v = drift_verdict({"input_psi": 0.3, "input_psi_noise": 0.4, "confidence_psi": 0.1,
                       "confidence_psi_noise": 0.5}, 0.25)
    assert v is not None and not v.firing and v.psi == 0.3
    v = drift_verdict({"input_psi": 0.1, "input_psi_noise": 0.05, "confidence_psi": 0.6,
                       "confidence_psi_noise": 0.5}, 0.25)
    assert v is not None and v.firing and v.score == "confidence_psi" and v.bar == 0.5


def test_batched_writes_match_the_single_ones(store: Store) -> None:
    """What the ingest's all-at-once path uses (pipelined on PostgreSQL)."""
    rows = [("b1", "ab" * 8, 1, "metrics", 1.0, 2.0, "{}"),
            ("b1", "ab" * 8, 2, "metrics", 1.0, 2.0, "{}"),
            ("b1", "ab" * 8, 1, "metrics", 1.0, 2.0, "{}"),  # a redelivery in the batch
            ("b2", "cd" * 8, 1, "event", 1.0, 2.0, "{}")]
    with store.transaction() as st:
        assert st.insert_messages(rows) == [True, True, False, True]
        st.touch_devices([("b1", 5.0, 2, 1), ("b2", 5.0, 1, 0)])
        st.touch_devices([("b1", 6.0, 0, 1)])
        fields = {"n_inferences": 7}
        assert st.update_metrics_many([("b1", 10.0, fields, {"x": 1}),
                                       ("b2", 10.0, fields, {"x": 2})]) == [True, True]
        # an older report never overwrites a newer one
        assert st.update_metrics_many([("b1", 9.0, {"n_inferences": 1}, {})]) == [False]
    assert st.insert_messages([]) == []
    b1 = store.device("b1")
    assert b1 is not None
    assert (b1["messages"], b1["duplicates"], b1["last_seen"]) == (2, 2, 6.0)
    assert (b1["n_inferences"], b1["last_metrics"]) == (7, {"x": 1})
    assert store.message_stats() == {"rows": 3, "distinct": 3}
