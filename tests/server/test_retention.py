"""Retention: old raw telemetry rolls up into hourly rows (SQLite and a real PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.server.cli.devices_cmd import parse_since
from edgefleet.server.telemetry.report import series
from edgefleet.server.telemetry.retention import HOUR, parse_age, prune
from edgefleet.server.telemetry.store import Store, open_store
from tests.conftest import run_cli

DAY = 86400.0
NOW = 1_000 * DAY  # a round instant: hours and days line up
BOOT = "b" * 16


def _payload(inferences: int, fallback: int, p95: float, p50: float, psi: float) -> str:
    return json.dumps({"v": 1, "body": {
        "inferences": inferences, "fallback": fallback, "degraded": 1,
        "latency_ms": {"p95": p95}, "confidence": {"p50": p50},
        "drift": {"input_psi": psi}}})


def _fill(store: Store) -> list[tuple[Any, ...]]:
    """Two devices, one metrics message every 10 minutes for 10 days back from NOW, plus
    one event per device and day; returns the rows."""
    rows: list[tuple[Any, ...]] = []
    seq = 0
    for device in ("d1", "d2"):
        for i in range(10 * 144):
            seq += 1
            ts = NOW - 10 * DAY + i * 600.0
            rows.append((device, BOOT, seq, "metrics", ts, ts,
                         _payload(10 + i % 7, i % 3, 1.0 + i % 5, 0.5 + (i % 4) / 10,
                                  0.01 * (i % 9))))
            if i % 144 == 0:
                seq += 1
                rows.append((device, BOOT, seq, "event", ts, ts, '{"v": 1, "body": {}}'))
    with store.transaction() as st:
        st.insert_messages(rows)  # type: ignore[arg-type]
    return rows


def _expected(rows: list[tuple[Any, ...]], cutoff: float) -> dict[tuple[str, float, str],
                                                                   dict[str, float]]:
    out: dict[tuple[str, float, str], dict[str, float]] = {}
    for device, _b, _s, kind, ts, _r, payload in rows:
        if ts >= cutoff:
            continue
        e = out.setdefault((device, ts // HOUR * HOUR, kind),
                           {"n": 0, "inferences": 0, "fallback": 0, "degraded": 0,
                            "lat": 0.0, "conf": 0.0, "psi": 0.0})
        e["n"] += 1
        if kind == "metrics":
            b = json.loads(payload)["body"]
            e["inferences"] += b["inferences"]
            e["fallback"] += b["fallback"]
            e["degraded"] += b["degraded"]
            e["lat"] += b["latency_ms"]["p95"]
            e["conf"] += b["confidence"]["p50"]
            e["psi"] += b["drift"]["input_psi"]
    return out


def _hourly(store: Store) -> dict[tuple[str, float, str], tuple[Any, ...]]:
    return {(r[0], float(r[1]), r[2]): tuple(r[3:]) for r in store.query(
        "SELECT device, hour, kind, n, inferences, fallback, degraded, latency_p95_sum, "
        "latency_p95_n, confidence_p50_sum, confidence_p50_n, drift_input_sum, "
        "drift_input_n FROM messages_hourly")}


def _raw(store: Store) -> list[tuple[Any, ...]]:
    return store.query("SELECT id, device, seq, kind, ts, payload FROM messages ORDER BY id")


def test_old_rows_roll_up_with_exact_aggregates_and_new_rows_stay(store: Store) -> None:
    rows = _fill(store)
    cutoff = NOW - 7 * DAY
    before = _raw(store)
    result = prune(store, keep_raw=7 * DAY, keep_hourly=90 * DAY, now=NOW, batch=97)
    expected = _expected(rows, cutoff)
    assert result.rolled_up == sum(int(e["n"]) for e in expected.values()) == 2 * 3 * 145
    assert result.batches == -(-result.rolled_up // 97)
    hourly = _hourly(store)
    assert set(hourly) == set(expected)
    for key, e in expected.items():
        n, inf, fb, dg, lat, lat_n, conf, conf_n, psi, psi_n = hourly[key]
        metrics = key[2] == "metrics"
        assert (n, inf, fb, dg) == (e["n"], e["inferences"], e["fallback"], e["degraded"])
        assert lat == pytest.approx(e["lat"]) and conf == pytest.approx(e["conf"])
        assert psi == pytest.approx(e["psi"])
        assert (lat_n, conf_n, psi_n) == ((6, 6, 6) if metrics else (0, 0, 0))
    # every row at or after the cutoff is untouched; none before it is left
    assert _raw(store) == [r for r in before if r[4] >= cutoff]
    newest = [h for h in store.hourly(limit=10) if h["device"] == "d2"][-1]
    assert newest["hour"] == cutoff - HOUR
    assert newest["latency_p95"] == pytest.approx(
        expected[("d2", cutoff - HOUR, "metrics")]["lat"] / 6)


def test_prune_is_idempotent(store: Store) -> None:
    _fill(store)
    prune(store, keep_raw=7 * DAY, keep_hourly=90 * DAY, now=NOW)
    hourly, raw = _hourly(store), _raw(store)
    again = prune(store, keep_raw=7 * DAY, keep_hourly=90 * DAY, now=NOW)
    assert (again.rolled_up, again.batches, again.hourly_deleted) == (0, 0, 0)
    assert again.hourly_rows == len(hourly) > 0
    assert _hourly(store) == hourly and _raw(store) == raw


def test_a_failure_mid_batch_loses_nothing_and_a_rerun_finishes(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _fill(store)
    execute = Store.execute
    deletes = {"n": 0}

    def failing(self: Store, sql: str, params: Any = ()) -> int:
        if sql.startswith("DELETE FROM messages WHERE id IN"):
            deletes["n"] += 1
            if deletes["n"] == 4:  # the upsert of this batch already ran: must roll back
                raise RuntimeError("disk gone")
        return execute(self, sql, params)

    monkeypatch.setattr(Store, "execute", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        prune(store, keep_raw=7 * DAY, keep_hourly=90 * DAY, now=NOW, batch=100)
    monkeypatch.setattr(Store, "execute", execute)
    # committed batches are rolled up, the failed one is still raw: every message counted once
    n_hourly = sum(v[0] for v in _hourly(store).values())
    assert n_hourly == 3 * 100
    assert n_hourly + len(_raw(store)) == len(rows)
    prune(store, keep_raw=7 * DAY, keep_hourly=90 * DAY, now=NOW, batch=100)
    expected = _expected(rows, NOW - 7 * DAY)
    assert {k: v[:4] for k, v in _hourly(store).items()} == {
        k: (e["n"], e["inferences"], e["fallback"], e["degraded"])
        for k, e in expected.items()}


def test_hourly_rows_age_out(store: Store) -> None:
    _fill(store)
    prune(store, keep_raw=2 * DAY, keep_hourly=90 * DAY, now=NOW)
    n_before = len(_hourly(store))
    result = prune(store, keep_raw=2 * DAY, keep_hourly=5 * DAY, now=NOW)
    left = _hourly(store)
    assert result.hourly_deleted == n_before - len(left) > 0
    assert min(k[1] for k in left) == NOW - 5 * DAY
    assert max(k[1] for k in left) == NOW - 2 * DAY - HOUR


def test_the_report_plots_rolled_up_history(store: Store) -> None:
    _fill(store)
    prune(store, keep_raw=1 * DAY, keep_hourly=90 * DAY, now=NOW)
    s = series(store)["d1"]
    assert len(s["ts"]) == 9 * 24 + 144  # hourly means, then the raw day
    assert s["ts"] == sorted(s["ts"])
    assert all(v is not None for v in s["latency_p95"])


def test_bad_arguments_are_refused(store: Store) -> None:
    assert parse_age("7d") == 7 * DAY and parse_age("12h") == 12 * HOUR
    assert parse_age("90") == 90.0 and parse_age("2w") == 14 * DAY
    for bad in ("", "d", "-1d", "0", "soon", "infd", "nan", "-30s"):
        with pytest.raises(UsageError):
            parse_age(bad)
        with pytest.raises(UsageError, match="--since"):  # devices logs --since: the same
            parse_since(bad)
    assert parse_since("30s") == 30.0 and parse_since("10m") == 600.0
    assert parse_since("2h") == 2 * HOUR and parse_since("1d") == DAY
    with pytest.raises(UsageError, match="keep-hourly"):
        prune(store, keep_raw=7 * DAY, keep_hourly=DAY)


def test_fleet_prune_cli(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    store = open_store(db)
    import time

    now = time.time()
    with store.transaction() as st:
        st.insert_messages([("d1", BOOT, i, "metrics", now - i * HOUR - 60, now,
                             _payload(5, 1, 2.0, 0.9, 0.1)) for i in range(48)])
    store.close()
    res = run_cli("fleet", "prune", "--db", str(db), "--keep-raw", "1d", "--keep-hourly",
                  "30d", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["rolled_up"] == 48 - 24 and out["hourly_rows"] == 24
    res = run_cli("fleet", "prune", "--db", str(db), "--keep-raw", "soon")
    assert res.returncode == 64 and "not an age" in res.stderr + res.stdout
