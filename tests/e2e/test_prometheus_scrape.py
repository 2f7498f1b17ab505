"""The real Prometheus (Debian's package) scrapes every service's /metrics: ingest with a
real mosquitto, the scorer, the registry, the dashboard, the fleet gauges; an agent writes
its textfile."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.agent.local_api import request
from edgefleet.device.wire.scoring import ScoreRequest, encode, request_topic, response_topic
from edgefleet.server.fleet.broker import MosquittoBroker, free_port
from tests.conftest import BIN
from tests.support import cascade as support
from tests.support.cascade import Spy, digit_rows, publish_request, spawn_scorer
from tests.support.telemetry import wait_until
from tests.support.updates import make_registry

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

cloud_pkg = support.cloud_pkg
device_pkg = support.device_pkg


def _prometheus() -> str:
    exe = shutil.which("prometheus")
    assert exe, ("the prometheus server binary is missing: run scripts/install-system-deps.sh "
                 "(Debian package prometheus)")
    return exe


def _api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]


def _value(port: int, query: str) -> float | None:
    try:
        res = _api(port, "query", query=query)["result"]
    except OSError:
        return None
    return float(res[0]["value"][1]) if res else None


def _status(url: str, form: dict[str, str] | None = None) -> int | None:
    """The HTTP status of a GET (or a form POST), not following redirects; None when
    nothing answers."""
    import http.client

    u = urllib.parse.urlsplit(url)
    try:
        c = http.client.HTTPConnection(u.hostname or "", u.port, timeout=10)
        if form is None:
            c.request("GET", u.path)
        else:
            c.request("POST", u.path, urllib.parse.urlencode(form),
                      {"Content-Type": "application/x-www-form-urlencoded"})
        return c.getresponse().status
    except OSError:
        return None


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "edgefleet"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.timeout(300)
def test_prometheus_scrapes_every_service(tmp_path: Path, mosquitto: MosquittoBroker,
                                          cloud_pkg: Path, device_pkg: Path) -> None:
    prom_exe = _prometheus()
    broker = f"{mosquitto.host}:{mosquitto.port}"
    db = tmp_path / "fleet.db"
    ports = {name: free_port() for name in ("ingest", "scorer", "registry", "fleet",
                                             "registry_http", "dashboard", "dashboard_http",
                                             "prometheus")}
    make_registry(tmp_path / "registry")
    procs: list[subprocess.Popen[Any]] = []
    agent: subprocess.Popen[bytes] | None = None
    try:
        procs.append(_spawn("ingest", "run", "--db", str(db), "--broker", broker,
                            "--metrics-port", str(ports["ingest"]), "--json"))
        procs.append(spawn_scorer(cloud_pkg, mosquitto, "s-prom", "--metrics-port",
                                  str(ports["scorer"])))
        procs.append(_spawn("registry", "serve", "--registry", str(tmp_path / "registry"),
                            "--port", str(ports["registry_http"]),
                            "--metrics-port", str(ports["registry"])))
        procs.append(_spawn("metrics", "serve", "--db", str(db), "--port",
                            str(ports["fleet"])))
        # The dashboard: one user, one wrong and one right sign-in to count.
        (tmp_path / "pw").write_text("prometheus test password")
        assert subprocess.run([str(BIN / "edgefleet"), "dashboard", "user", "add", "alice",
                               "--password-file", str(tmp_path / "pw"), "--state",
                               str(tmp_path / "dash")], check=False).returncode == 0
        assert wait_until(db.exists, 60), "the ingest never created the store"
        procs.append(_spawn("dashboard", "serve", "--db", str(db), "--state",
                            str(tmp_path / "dash"), "--registry", str(tmp_path / "registry"),
                            "--port", str(ports["dashboard_http"]),
                            "--metrics-port", str(ports["dashboard"])))
        dash = f"http://127.0.0.1:{ports['dashboard_http']}"
        assert wait_until(lambda: _status(dash + "/healthz") == 200, 60), "no dashboard"
        assert _status(dash + "/login", {"user": "alice", "password": "wrong!"}) == 401
        assert _status(dash + "/login", {"user": "alice",
                                         "password": "prometheus test password"}) == 303
        # The agent: telemetry to the same broker, counters into a textfile.
        state, textfile = tmp_path / "state", tmp_path / "textfile" / "edgefleet.prom"
        textfile.parent.mkdir()
        cfg = tmp_path / "agent.toml"
        cfg.write_text("\n".join([
            'device_id = "dev-prom"', f'state_dir = "{state}"',
            "[mqtt]", f'host = "{mosquitto.host}"', f"port = {mosquitto.port}",
            "[model]", f'package = "{device_pkg}"', "threads = 1",
            "[telemetry]", "interval_s = 0.3",
            "[fallback]", 'mode = "features"', "deadline_ms = 50",
            "[metrics]", f'textfile = "{textfile}"', "interval_s = 1"]) + "\n")
        agent = subprocess.Popen([str(BIN / "edgefleet-agent"), "run", "--config", str(cfg)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_until((state / "agent.sock").exists, 60), "the agent's API never came up"
        reply = request(state / "agent.sock", {"id": 1, "input": digit_rows(20).tolist()})
        assert len(reply["predictions"]) == 20, reply
        # One request to the scorer, answered.
        row = digit_rows(1)[0]
        req = ScoreRequest(task="digits", model="digits-mlp@1.0.0", mode="features",
                           features=[float(v) for v in row], deadline_ms=5000)
        with Spy(mosquitto, response_topic("prom")) as spy:
            publish_request(spy, request_topic("prom"), encode(req),
                            reply_to=response_topic("prom"), corr=b"1")
            spy.wait_for(lambda ms: len(ms) >= 1, 15)
        # One registry download.
        urllib.request.urlopen(f"http://127.0.0.1:{ports['registry_http']}/metadata/"
                               "1.root.json", timeout=10).read()
        # The agent's textfile holds its counters, in a format Prometheus' linter accepts.
        assert wait_until(lambda: "edgefleet_inferences_total" in (
            textfile.read_text() if textfile.exists() else ""), 30), "no agent textfile"
        lint = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"],
                              input=textfile.read_text(), text=True, capture_output=True,
                              check=False)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        # Stop the agent: what it sent is now all there is to store.
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0

        jobs = {"ingest": ports["ingest"], "scorer": ports["scorer"],
                "registry": ports["registry"], "fleet": ports["fleet"],
                "dashboard": ports["dashboard"]}
        conf = tmp_path / "prometheus.yml"
        conf.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n" + "".join(
            f"  - job_name: edgefleet-{job}\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{port}']\n" for job, port in jobs.items()))
        procs.append(subprocess.Popen(
            [prom_exe, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        pport = ports["prometheus"]

        def all_up() -> bool:
            try:
                targets = _api(pport, "targets")["activeTargets"]
            except OSError:
                return False
            return len(targets) == len(jobs) and all(t["health"] == "up" for t in targets)

        assert wait_until(all_up, 90, every=0.5), _api(pport, "targets")

        with sqlite3.connect(db) as conn:
            stored = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert stored > 0
        # Everything the ingest stored, and nothing else, is in its counter.
        assert wait_until(lambda: _value(pport, "edgefleet_ingest_stored_total") == stored,
                          30, every=0.5), (_value(pport, "edgefleet_ingest_stored_total"),
                                           stored)
        assert wait_until(lambda: (_value(pport, "edgefleet_scorer_replies_ok_total")
                                   or 0) >= 1, 30, every=0.5)
        assert (_value(pport, "edgefleet_scorer_request_seconds_count") or 0) >= 1
        assert wait_until(lambda: _value(
            pport, 'edgefleet_registry_requests_total{kind="metadata",code="200"}') == 1, 30,
            every=0.5)
        assert wait_until(lambda: (_value(
            pport, 'edgefleet_device_inferences{device="dev-prom"}') or 0) >= 20, 30,
            every=0.5)
        assert _value(pport, 'edgefleet_device_share{device="dev-prom",path="local"}') \
            is not None
        assert (_value(pport, "edgefleet_ingest_batch_commit_seconds_count") or 0) >= 1
        assert wait_until(lambda: _value(pport, "edgefleet_dashboard_logins_total") == 1, 30,
                          every=0.5)
        assert _value(pport, "edgefleet_dashboard_refused_bad_login_total") == 1
        assert _value(pport, 'up{job="edgefleet-dashboard"}') == 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
