"""Prometheus export: the Metrics translation (checked by Prometheus' own promtool), the
fleet gauges over a real store, the registry's request metrics, the shipped alert rules."""

from __future__ import annotations

import shutil
import stat
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.prom_text import families, labelled, render, write_textfile
from edgefleet.server.metrics.exporter import MetricsCollector, serve_metrics
from edgefleet.server.metrics.fleet import FleetCollector
from edgefleet.server.registry.http import RegistryServer
from edgefleet.server.telemetry.store import open_store

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: run scripts/install-system-deps.sh (Debian prometheus)"
    return tool


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample_metrics() -> Metrics:
    m = Metrics()
    m.inc("ingest_stored", 7)
    m.inc(labelled("registry_requests", kind="metadata", code="200"), 2)
    m.set("agent_state", "serving")
    m.set("queue", 3)
    m.set("unset", None)
    m.observe("inference_latency_ms", 3.0)
    m.observe("batch_seconds", 0.02, (0.01, 0.1))
    return m


def test_translation_is_valid_prometheus_text() -> None:
    text = render(families(_sample_metrics().snapshot()))
    got = _samples(text)
    assert got[("edgefleet_ingest_stored_total", frozenset())] == 7
    assert got[("edgefleet_registry_requests_total",
                frozenset({("kind", "metadata"), ("code", "200")}))] == 2
    assert got[("edgefleet_agent_state", frozenset({("value", "serving")}))] == 1
    assert got[("edgefleet_queue", frozenset())] == 3
    assert not any(name.startswith("edgefleet_unset") for name, _ in got)
    # A _ms histogram is exported in seconds: 3 ms lands at le=0.005, not before.
    assert got[("edgefleet_inference_latency_seconds_bucket", frozenset({("le", "0.002")}))] == 0
    assert got[("edgefleet_inference_latency_seconds_bucket", frozenset({("le", "0.005")}))] == 1
    assert got[("edgefleet_inference_latency_seconds_sum", frozenset())] == pytest.approx(0.003)
    assert got[("edgefleet_batch_seconds_bucket", frozenset({("le", "+Inf")}))] == 1
    # Prometheus' own linter accepts it (HELP, TYPE, counter names).
    res = subprocess.run([_promtool(), "check", "metrics"], input=text, text=True,
                         capture_output=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_textfile_is_written_atomically_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "edgefleet.prom"
    m = _sample_metrics()
    write_textfile(path, m)
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # node-exporter's user reads it
    m.inc("ingest_stored")
    write_textfile(path, m)
    assert _samples(path.read_text())[("edgefleet_ingest_stored_total", frozenset())] == 8
    assert [p.name for p in tmp_path.iterdir()] == ["edgefleet.prom"]  # no temp file left


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def test_fleet_gauges_from_the_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    now = 1_000_000.0
    with store.transaction() as st:
        st.touch_devices([("pi-1", now - 30, 5, 0), ("pi-2", now - 500, 1, 0)])
        st.set_status("pi-1", True, now - 30, "b1")
        st.update_metrics("pi-1", now - 30, {
            "model_name": "digits-mlp", "model_version": "1.2.0", "training_state": "ready",
            "epsilon": 2.5, "n_inferences": 200, "n_local": 150, "n_fallback": 40,
            "n_degraded": 10, "drift_input": 0.05, "drift_confidence": 0.4,
            "spool_dropped": 0}, {})
        st.open_alert("pi-1", "drift", now - 10)
    own = Metrics()
    ep = serve_metrics(0, [MetricsCollector(own),
                           FleetCollector(store, epsilon_budget=10.0, metrics=own,
                                          clock=lambda: now)])
    try:
        got = _samples(_scrape(ep.url))
    finally:
        ep.close()

    def v(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert v("edgefleet_fleet_devices", status="online") == 1
    assert v("edgefleet_fleet_devices", status="silent") == 1  # 500 s > silent_after 120
    assert v("edgefleet_fleet_alerts_open", kind="drift") == 1
    assert v("edgefleet_device_online", device="pi-1") == 1
    assert v("edgefleet_device_last_seen_age_seconds", device="pi-2") == 500
    assert v("edgefleet_device_inferences", device="pi-1") == 200
    assert v("edgefleet_device_share", device="pi-1", path="cloud") == pytest.approx(0.2)
    assert v("edgefleet_device_share", device="pi-1", path="degraded") == pytest.approx(0.05)
    assert v("edgefleet_device_drift_psi", device="pi-1", score="confidence") == 0.4
    assert v("edgefleet_device_epsilon_spent", device="pi-1") == 2.5
    assert v("edgefleet_fleet_epsilon_budget") == 10
    assert v("edgefleet_device_alert_open", device="pi-1", kind="drift") == 1
    assert v("edgefleet_device_model_info", device="pi-1", model="digits-mlp",
             version="1.2.0") == 1
    assert v("edgefleet_alert_threshold_drift_psi") == 0.25
    assert ("edgefleet_process_open_fds", frozenset()) in got
    store.close()


def test_fleet_gauges_bound_per_device_series(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    with store.transaction() as st:
        st.touch_devices([(f"pi-{i}", 100.0, 1, 0) for i in range(5)])
    ep = serve_metrics(0, [FleetCollector(store, max_devices=2, clock=lambda: 110.0)],
                       process=False)
    try:
        text = _scrape(ep.url)
    finally:
        ep.close()
    got = _samples(text)
    assert got[("edgefleet_fleet_devices_unexported", frozenset())] == 3
    assert got[("edgefleet_fleet_devices", frozenset({("status", "online")}))] \
        + got[("edgefleet_fleet_devices", frozenset({("status", "offline")}))] == 5
    per_device = {dict(k[1]).get("device") for k in got if k[0] == "edgefleet_device_online"}
    assert per_device == {"pi-0", "pi-1"}
    store.close()


def test_fleet_gauges_survive_a_broken_store(tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    own = Metrics()
    store.close()  # every query now fails
    ep = serve_metrics(0, [MetricsCollector(own), FleetCollector(store, metrics=own)],
                       process=False)
    try:
        first = _scrape(ep.url)
        second = _samples(_scrape(ep.url))
    finally:
        ep.close()
    assert "edgefleet_device_" not in first
    assert second[("edgefleet_fleet_metrics_store_errors_total", frozenset())] >= 1


def test_registry_counts_requests_by_file_kind_and_status(tmp_path: Path) -> None:
    meta, arts = tmp_path / "metadata", tmp_path / "artifacts"
    meta.mkdir()
    arts.mkdir()
    (meta / "1.root.json").write_text("{}")
    srv = RegistryServer(meta, arts).start()
    try:
        for path in ("/metadata/1.root.json", "/metadata/1.root.json",
                     "/metadata/2.root.json", "/nothing"):
            try:
                urllib.request.urlopen(srv.url + path, timeout=10).read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
    finally:
        srv.stop()
    got = _samples(render(families(srv.metrics.snapshot())))
    assert got[("edgefleet_registry_requests_total",
                frozenset({("kind", "metadata"), ("code", "200")}))] == 2
    assert got[("edgefleet_registry_requests_total",
                frozenset({("kind", "metadata"), ("code", "404")}))] == 1
    assert got[("edgefleet_registry_requests_total",
                frozenset({("kind", "other"), ("code", "404")}))] == 1
    assert got[("edgefleet_registry_request_seconds_count",
                frozenset({("kind", "metadata")}))] == 3


def test_shipped_alert_rules_and_scrape_config_pass_promtool() -> None:
    tool = _promtool()
    rules = subprocess.run([tool, "check", "rules", str(DOCS / "prometheus" /
                                                       "edgefleet-alerts.yml")],
                           capture_output=True, text=True, check=False)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "9 rules found" in rules.stdout
    conf = subprocess.run([tool, "check", "config", str(DOCS / "prometheus" /
                                                        "prometheus.yml")],
                          capture_output=True, text=True, check=False)
    assert conf.returncode == 0, conf.stdout + conf.stderr


def test_dashboard_queries_only_exported_series() -> None:
    import json
    import re

    dash = json.loads((DOCS / "grafana" / "edgefleet-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set(re.findall(r"edgefleet_[a-z_]+", " ".join(exprs)))
    known = {"edgefleet_fleet_devices", "edgefleet_fleet_alerts_open",
             "edgefleet_fleet_devices_unexported", "edgefleet_fleet_epsilon_budget",
             "edgefleet_alert_threshold_drift_psi", "edgefleet_ingest_stored_total",
             "edgefleet_ingest_duplicates_total", "edgefleet_ingest_rejected_",
             "edgefleet_ingest_batch_commit_seconds_bucket", "edgefleet_scorer_requests_total",
             "edgefleet_scorer_replies_ok_total", "edgefleet_scorer_expired_total",
             "edgefleet_scorer_request_seconds_bucket", "edgefleet_registry_requests_total",
             "edgefleet_registry_request_seconds_bucket", "edgefleet_device_drift_psi",
             "edgefleet_device_epsilon_spent", "edgefleet_device_share",
             "edgefleet_guard_passes_total", "edgefleet_guard_canaries_stopped_total",
             "edgefleet_guard_canaries_running", "edgefleet_device_online",
             "edgefleet_device_last_seen_age_seconds", "edgefleet_device_inferences"}
    assert names <= known, names - known
