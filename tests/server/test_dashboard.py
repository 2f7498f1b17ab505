"""The dashboard app through Starlette's TestClient: sign-in, sessions, CSRF, escaping,
bounds, actions that land in the stores and the audit log, the live stream."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from edgefleet.device.core.metrics import Metrics
from edgefleet.server.dashboard.app import COOKIE, MAX_FORM, DashboardConfig, create_app
from edgefleet.server.dashboard.auth import LoginLimiter, SessionSigner, Users, load_secret
from edgefleet.server.dashboard.pages import device_link
from edgefleet.server.dashboard.views import Sources
from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.retrain.policy import Approvals
from edgefleet.server.telemetry.store import Store, open_store
from tests.support import cascade
from tests.support.dashboard import HOSTILE, seed_fleet

device_pkg = cascade.device_pkg

PASSWORD = "correct horse battery"


class Fleet:
    def __init__(self, tmp: Path, *, tls: bool = False) -> None:
        self.store: Store = open_store(tmp / "fleet.db")
        self.registry = tmp / "registry"
        self.request_id = seed_fleet(self.store, self.registry)
        self.state = tmp / "dash"
        Users(self.state).add("alice", PASSWORD)
        self.metrics = Metrics()
        src = Sources(store=self.store, registry=self.registry, groups={"pi-01": "lab"})
        self.cfg = DashboardConfig(sources=src, state=self.state,
                                   secret=load_secret(self.state), tls=tls,
                                   interval=0.05, stream_seconds=0.2)
        base = "https://testserver" if tls else "http://testserver"
        self.client = TestClient(create_app(self.cfg, self.metrics), base_url=base,
                                 follow_redirects=False)

    def login(self, password: str = PASSWORD, user: str = "alice") -> object:
        return self.client.post("/login", data={"user": user, "password": password,
                                                "next": "/alerts"})

    def csrf(self, path: str = "/alerts") -> str:
        m = re.search(r'name="csrf" value="([0-9a-f]+)"', self.client.get(path).text)
        assert m, "no CSRF token on the page"
        return m.group(1)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.store.close()


def test_pages_need_a_session(fleet: Fleet) -> None:
    for path in ("/", "/devices/pi-01", "/rollouts", "/fl", "/alerts", "/report/"):
        r = fleet.client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    assert fleet.client.get("/events").status_code == 401
    assert fleet.client.get("/login").status_code == 200


def test_wrong_password_refused_right_one_signs_in(fleet: Fleet) -> None:
    r = fleet.login("not the password")
    assert r.status_code == 401 and r.headers["x-refused-reason"] == "bad_login"
    assert COOKIE not in r.cookies
    assert fleet.login(user="mallory").status_code == 401
    assert fleet.metrics.counter("dashboard_refused_bad_login") == 2
    r = fleet.login()
    assert r.status_code == 303 and r.headers["location"] == "/alerts"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert fleet.client.get("/").status_code == 200


def test_cookie_is_secure_over_tls(tmp_path: Path) -> None:
    f = Fleet(tmp_path, tls=True)
    try:
        cookie = f.login().headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie
    finally:
        f.store.close()


def test_open_redirect_after_login_refused(fleet: Fleet) -> None:
    r = fleet.client.post("/login", data={"user": "alice", "password": PASSWORD,
                                          "next": "//evil.example/x"})
    assert r.headers["location"] == "/"


def test_login_rate_limited_per_client(fleet: Fleet) -> None:
    for _ in range(5):
        assert fleet.login("wrong password!").status_code == 401
    r = fleet.login()  # even the right password waits now
    assert r.status_code == 429 and r.headers["x-refused-reason"] == "rate_limited"
    assert fleet.metrics.counter("dashboard_refused_rate_limited") == 1


def test_limiter_window_and_bound() -> None:
    lim = LoginLimiter(attempts=2, window=10, clients=3)
    lim.failed("a", 0.0)
    lim.failed("a", 1.0)
    assert lim.blocked("a", 5.0) and not lim.blocked("a", 11.5)
    for c in "bcde":
        lim.failed(c, 2.0)
    assert len(lim._fails) == 3


def test_forged_expired_and_removed_sessions_refused(fleet: Fleet) -> None:
    signer = SessionSigner(load_secret(fleet.state))
    assert signer.verify(signer.issue("alice")) is not None
    assert signer.verify(signer.issue("alice", now=0)) is None  # expired
    other = SessionSigner(b"x" * 32).issue("alice")
    assert signer.verify(other) is None
    fleet.client.cookies.set(COOKIE, other)
    assert fleet.client.get("/").status_code == 303
    fleet.client.cookies.set(COOKIE, signer.issue("alice"))
    assert fleet.client.get("/").status_code == 200
    Users(fleet.state).remove("alice")
    assert fleet.client.get("/").status_code == 303


def test_users_store_hashes_owner_only(fleet: Fleet) -> None:
    path = fleet.state / "users.json"
    assert PASSWORD not in path.read_text() and "$7$" in path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    assert (fleet.state / "secret").stat().st_mode & 0o077 == 0
    assert Users(fleet.state).check("alice", PASSWORD)
    assert not Users(fleet.state).check("alice", PASSWORD + "x")
    with pytest.raises(Exception, match="password"):
        Users(fleet.state).add("bob", "short")
    with pytest.raises(Exception, match="valid user"):
        Users(fleet.state).add("<b>", PASSWORD)
    with pytest.raises(Exception, match="valid user"):
        Users(fleet.state).add("bob\n", PASSWORD)


def test_hostile_names_render_as_text(fleet: Fleet) -> None:
    fleet.login()
    for path in ("/", "/alerts"):
        page = fleet.client.get(path).text
        assert HOSTILE not in page
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    # no page link for a name no device id can have
    assert 'href="/devices/%3Cscript' not in fleet.client.get("/").text
    csp = fleet.client.get("/").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def test_pages_show_the_fleet(fleet: Fleet) -> None:
    fleet.login()
    page = fleet.client.get("/").text
    assert "pi-01" in page and "pi-02" in page and 'name="viewport"' in page
    assert fleet.client.get("/?status=offline").text.count('data-row="') == 1
    assert fleet.client.get("/?group=lab").text.count('data-row="') == 1
    assert fleet.client.get("/?q=pi-0").text.count('data-row="') == 2
    dev = fleet.client.get("/devices/pi-01").text
    assert "History" in dev and 'id="logs"' in dev and "drift" in dev
    assert fleet.client.get("/fl").status_code == 200
    assert "no registry" in fleet.client.get("/rollouts").text
    assert fleet.request_id in fleet.client.get("/alerts").text


def test_query_and_names_checked(fleet: Fleet) -> None:
    fleet.login()
    cases = [("/?status=<x>", "bad_query", 400), ("/?q=" + "a" * 65, "bad_query", 400),
             ("/?group=nosuch", "bad_query", 400), ("/devices/%3Cb%3E", "bad_name", 400),
             ("/devices/nosuch", "unknown_device", 404), ("/report/../secret", "", 404),
             ("/static/app.py", "unknown_file", 404),
             # ``$`` of a pattern matches before a final newline: names must match whole
             ("/devices/pi-01%0A", "bad_name", 400)]
    for path, reason, status in cases:
        r = fleet.client.get(path)
        assert r.status_code == status, path
        if reason:
            assert r.headers["x-refused-reason"] == reason, path
    assert "<a" in device_link("pi-01") and "<a" not in device_link("pi-01\n")


def test_actions_need_csrf(fleet: Fleet) -> None:
    fleet.login()
    for data in ({"device": "pi-01", "kind": "drift"},
                 {"device": "pi-01", "kind": "drift", "csrf": "0" * 64}):
        r = fleet.client.post("/alerts/ack", data=data)
        assert r.status_code == 403 and r.headers["x-refused-reason"] == "bad_csrf"
    assert fleet.metrics.counter("dashboard_refused_bad_csrf") == 2
    assert not fleet.store.events(prefix="ack.")
    r = fleet.client.post("/alerts/ack", data={"csrf": fleet.csrf(), "device": "pi-01\n",
                                               "kind": "drift"})
    assert r.status_code == 400 and r.headers["x-refused-reason"] == "bad_name"
    assert not fleet.store.events(prefix="ack.")
    fleet.client.cookies.clear()
    r = fleet.client.post("/alerts/ack", data={"device": "pi-01", "kind": "drift"})
    assert r.status_code == 401


def test_acknowledge_alert_lands_in_store_and_audit(fleet: Fleet) -> None:
    fleet.login()
    r = fleet.client.post("/alerts/ack", data={"csrf": fleet.csrf(), "device": "pi-01",
                                               "kind": "drift"})
    assert r.status_code == 303, r.text
    [ev] = fleet.store.events(prefix="ack.")
    assert ev["device"] == "pi-01" and ev["data"]["actor"] == "dashboard:alice"
    entries = AuditLog(fleet.registry / "audit.jsonl").entries()
    assert entries[-1]["action"] == "alert.ack" and entries[-1]["actor"] == "dashboard:alice"
    AuditLog(fleet.registry / "audit.jsonl").verify()
    assert "acknowledged by dashboard:alice" in fleet.client.get("/alerts").text
    r = fleet.client.post("/alerts/ack", data={"csrf": fleet.csrf(), "device": "pi-02",
                                               "kind": "drift"})
    assert r.status_code == 409 and r.headers["x-refused-reason"] == "action_failed"


def test_approve_and_deny_go_through_decide(fleet: Fleet) -> None:
    fleet.login()
    bad = fleet.client.post("/approvals", data={"csrf": fleet.csrf(), "request": "nosuch!",
                                                "decision": "approve"})
    assert bad.status_code == 400 and bad.headers["x-refused-reason"] == "bad_name"
    r = fleet.client.post("/approvals", data={"csrf": fleet.csrf(),
                                              "request": fleet.request_id,
                                              "decision": "approve"})
    assert r.status_code == 303
    approvals = Approvals(fleet.registry / "retrain.db")
    [row] = approvals.rows()
    approvals.db.close()
    assert row["status"] == "approved" and row["actor"] == "dashboard:alice"
    last = AuditLog(fleet.registry / "audit.jsonl").entries()[-1]
    assert last["action"] == "retrain.approved" and last["actor"] == "dashboard:alice"
    again = fleet.client.post("/approvals", data={"csrf": fleet.csrf(),
                                                  "request": fleet.request_id,
                                                  "decision": "deny"})
    assert again.status_code == 409 and "already approved" in again.text


def test_form_bounds(fleet: Fleet) -> None:
    fleet.login()
    csrf = fleet.csrf()
    r = fleet.client.post("/alerts/ack", content=b"csrf=" + b"a" * (MAX_FORM + 1),
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and r.headers["x-refused-reason"] == "form_too_large"
    r = fleet.client.post("/alerts/ack", content=f"csrf={csrf}&device=a&device=b&kind=drift",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and r.headers["x-refused-reason"] == "bad_form"
    r = fleet.client.post("/alerts/ack", content=b"csrf=\xff\xfe",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    r = fleet.client.post("/approvals", data={"csrf": csrf, "request": fleet.request_id,
                                              "decision": "maybe"})
    assert r.status_code == 400


def test_event_stream_carries_live_numbers(fleet: Fleet) -> None:
    fleet.login()
    with fleet.client.stream("GET", "/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert "event: fleet" in text and '"pi-01"' in text and '"inferences":300' in text


def test_a_stream_dropped_before_its_first_byte_frees_its_slot(fleet: Fleet) -> None:
    """A client gone before its stream starts (an aborted connect) gives its slot back:
    after more such requests than ``max_streams`` the live view still opens."""
    fleet.login()
    cookie = f"{COOKIE}={fleet.client.cookies[COOKIE]}".encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/events", "raw_path": b"/events",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80),
             "headers": [(b"host", b"testserver"), (b"cookie", cookie)]}

    async def gone() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def drop(_message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a real transport's send gives the loop a turn

    for _ in range(fleet.cfg.max_streams + 1):
        asyncio.run(fleet.client.app(dict(scope), gone, drop))
    gc.collect()
    assert fleet.metrics.snapshot()["gauges"]["dashboard_streams_open"] == 0
    with fleet.client.stream("GET", "/events") as r:
        assert r.status_code == 200
        assert "event: fleet" in "".join(r.iter_text())


def test_cli_ack_is_the_same_action(fleet: Fleet, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    res = run_cli("alerts", "--db", str(tmp_path / "fleet.db"), "--json", "--ack",
                  "pi-01:drift", "--registry", str(fleet.registry))
    assert res.returncode == 0, res.stderr
    [ev] = fleet.store.events(prefix="ack.")
    assert ev["device"] == "pi-01"
    assert AuditLog(fleet.registry / "audit.jsonl").entries()[-1]["action"] == "alert.ack"
    res = run_cli("alerts", "--db", str(tmp_path / "fleet.db"), "--ack", "pi-01")
    assert res.returncode != 0 and "DEVICE:KIND" in res.stderr + res.stdout


def _retained(port: int, pattern: str, settle: float = 1.0) -> dict[str, dict[str, Any]]:
    """The retained messages under ``pattern``: the signed part of each assignment."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    got: dict[str, dict[str, Any]] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, json.loads(m.payload)["signed"])
    c.connect("127.0.0.1", port)
    c.subscribe(pattern, qos=1)
    c.loop_start()
    time.sleep(settle)  # retained messages arrive at once; this is no assertion on time
    c.loop_stop()
    c.disconnect()
    return got


class RolloutFleet:
    """The dashboard's Fleet with a real registry holding real packages 1.0.0 and 1.1.0, and
    the rollout commands' controller (director-signed assignments) on a real broker."""

    def __init__(self, tmp: Path, port: int, pkg: Path) -> None:
        from edgefleet.server.cli.registry_cmd import open_registry
        from tests.support.updates import make_registry, package_version

        self.f = Fleet(tmp)
        self.reg_home, self.port = self.f.registry, port
        reg = make_registry(self.reg_home)
        for v in ("1.0.0", "1.1.0"):
            reg.push(package_version(pkg, tmp / f"pkg-{v}", v))
        reg.close()
        self.f.cfg.sources.open_registry = lambda: open_registry(self.reg_home)
        self.f.cfg.sources.controller = self.controller

    def controller(self) -> tuple[Any, Any]:
        """What `edgefleet dashboard serve` hands the actions (rollout_cmd's controller)."""
        from edgefleet.server.cli.registry_cmd import open_registry
        from edgefleet.server.rollout.controller import RolloutController
        from edgefleet.server.rollout.fleet_view import FleetView

        view = FleetView("127.0.0.1", self.port)
        view.fleet(1.0)
        return RolloutController(open_registry(self.reg_home), view, view), view

    def canary(self, version: str = "1.1.0") -> str:
        ctl, view = self.controller()
        try:
            r = ctl.start("digits-mlp", version, fleet={"pi-01": "1.0.0", "pi-02": "1.0.0"},
                          devices=["pi-01"], actor="cli")
        finally:
            ctl.close()
            view.close()
        return r.id

    def status(self, rid: str) -> str:
        ctl, view = self.controller()
        try:
            return ctl.get(rid).status
        finally:
            ctl.close()
            view.close()

    def audit(self) -> list[tuple[str, str]]:
        log = AuditLog(self.reg_home / "audit.jsonl")
        log.verify()
        return [(e["action"], e["actor"]) for e in log.entries()]


def test_promote_from_the_dashboard_signs_for_the_fleet(tmp_path: Path, mosquitto: Any,
                                                        device_pkg: Path) -> None:
    """Promote a running canary from the dashboard: a real registry with real packages, the
    director-signed path on a real broker; the rollout DB, the retained assignments and the
    audit log say so, with the dashboard user as actor."""
    rf = RolloutFleet(tmp_path, mosquitto.port, device_pkg)
    f = rf.f
    try:
        rid = rf.canary()
        f.login()
        page = f.client.get("/rollouts").text
        assert "digits-mlp@1.1.0" in page and "0/1 canary devices" in page
        r = f.client.post("/rollouts/digits-mlp/promote", data={"csrf": f.csrf("/rollouts")})
        assert r.status_code == 303, r.text
        assert rf.status(rid) == "promoted"
        assert rf.audit()[-1] == ("rollout.promote", "dashboard:alice")
        seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
        assert {t.rsplit("/", 1)[-1]: (a["version"], a["rollout"], a["device"])
                for t, a in seen.items()} == {"pi-01": ("1.1.0", rid, "pi-01")}
        page = f.client.get("/rollouts").text
        assert "promoted" in page and "rollout.promote" in page and "dashboard:alice" in page
        again = f.client.post("/rollouts/digits-mlp/promote",
                              data={"csrf": f.csrf("/rollouts")})
        assert again.status_code == 409 and "no running rollout" in again.text
        assert f.metrics.counter("dashboard_actions") == 1
    finally:
        f.store.close()


def test_rollouts_page_and_rollback_through_the_broker(tmp_path: Path, mosquitto: Any,
                                                       device_pkg: Path) -> None:
    """Roll back from the dashboard: the controller the `rollback` command uses, on a real
    broker; the rollout stops, the canary device is signed back to 1.0.0 and the audit log
    names the dashboard user."""
    rf = RolloutFleet(tmp_path, mosquitto.port, device_pkg)
    f = rf.f
    try:
        rid = rf.canary()
        f.login()
        page = f.client.get("/rollouts").text
        assert "Promote" in page and "Roll back" in page
        r = f.client.post("/rollouts/digits-mlp/rollback", data={"csrf": f.csrf("/rollouts")})
        assert r.status_code == 303, r.text
        assert rf.status(rid) == "stopped"
        assert rf.audit()[-2:] == [("rollout.stopped", "dashboard:alice"),
                                   ("rollout.rollback", "dashboard:alice")]
        seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
        assert {t.rsplit("/", 1)[-1]: a["version"] for t, a in seen.items()} == {
            "pi-01": "1.0.0"}
        page = f.client.get("/rollouts").text
        assert "rolled back by the operator" in page and "rollout.rollback" in page
        bad = f.client.post("/rollouts/%3Cx%3E/promote", data={"csrf": f.csrf("/rollouts")})
        assert bad.status_code == 400 and bad.headers["x-refused-reason"] == "bad_name"
        none = f.client.post("/rollouts/digits-mlp/promote", data={"csrf": f.csrf("/rollouts")})
        assert none.status_code == 409 and "no running rollout" in none.text
    finally:
        f.store.close()


def test_plots_are_the_static_reports(fleet: Fleet) -> None:
    fleet.login()
    index = fleet.client.get("/report/")
    assert index.status_code == 200 and "edgefleet fleet report" in index.text
    png = fleet.client.get("/report/latency.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert (fleet.state / "report" / "index.html").is_file()


def test_serve_refuses_without_users_or_half_tls(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    open_store(tmp_path / "fleet.db").close()
    base = ("dashboard", "serve", "--db", str(tmp_path / "fleet.db"), "--state",
            str(tmp_path / "dash"), "--registry", str(tmp_path / "reg"))
    res = run_cli(*base)
    assert res.returncode != 0 and "dashboard user add" in res.stdout + res.stderr
    res = run_cli(*base, "--tls-cert", str(tmp_path / "c.pem"))
    assert res.returncode != 0 and "--tls-key" in res.stdout + res.stderr


def test_federated_page_shows_rounds_spread_and_declines(tmp_path: Path) -> None:
    from edgefleet.server.fl.store import FlStore, RoundRow

    f = Fleet(tmp_path)
    fl = FlStore(tmp_path / "fl.db")
    fl.start_run("run-<b>1</b>", "42", {"strategy": "fedavg"})
    fl.add_round("run-<b>1</b>", RoundRow(1, 0.81, 0.5, 3, 1, 0, 0.7, 0.8, 2.0, 10, 10,
                                           {"budget": 1}))
    fl.add_device_evals("run-<b>1</b>", 1, {11: (0.9, 50), 22: (0.6, 40)})
    f.cfg.sources.fl_db = tmp_path / "fl.db"
    try:
        f.login()
        page = f.client.get("/fl").text
        assert "run-&lt;b&gt;1&lt;/b&gt;" in page and "<b>1</b>" not in page
        assert "0.810" in page and "0.700" in page and "budget 1" in page
        assert "min 0.600" in page and "max 0.900" in page and "worst node 22" in page
    finally:
        f.store.close()


class FakeLogs:
    """``devices logs``' client as the dashboard uses it: what was asked, what to answer."""

    def __init__(self, lines: list[object] | None = None, error: Exception | None = None
                 ) -> None:
        self.lines, self.error = lines or [], error
        self.asked: list[tuple[str, dict[str, object]]] = []

    def __call__(self, device: str) -> FakeLogs:
        self.device = device
        return self

    def __enter__(self) -> FakeLogs:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def fetch(self, **kw: object) -> list[object]:
        self.asked.append((self.device, kw))
        if self.error is not None:
            raise self.error
        return self.lines


def test_device_logs_on_demand_escaped_and_bounded(fleet: Fleet) -> None:
    from edgefleet.device.wire.logs import LogLine

    hostile = LogLine(1.7e9, "WARNING", "app.<i>x</i>",
                      f"{HOSTILE} \x1b[2Jcleared\x07 [REDACTED]")
    fake = FakeLogs([LogLine(1.7e9, "INFO", "edgefleet.agent", "agent pi-01 started"), hostile])
    fleet.cfg.sources.logs = fake
    fleet.login()
    dev = fleet.client.get("/devices/pi-01").text  # the device page asks nothing itself
    assert 'action="/devices/pi-01/logs"' in dev and "Fetch recent logs" in dev
    assert fake.asked == []
    r = fleet.client.get("/devices/pi-01/logs?lines=50&level=INFO")
    assert r.status_code == 200, r.text
    assert fake.asked == [("pi-01", {"lines": 50, "level": "INFO",
                                     "timeout": fleet.cfg.logs_timeout})]
    assert "agent pi-01 started" in r.text and "[REDACTED]" in r.text
    assert HOSTILE not in r.text and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in r.text
    assert "app.&lt;i&gt;x&lt;/i&gt;" in r.text
    assert "\x1b" not in r.text and "\x07" not in r.text and "?[2Jcleared?" in r.text
    assert fleet.metrics.counter("dashboard_logs_fetched") == 1
    assert fleet.metrics.counter("dashboard_log_lines") == 2
    # Bounds: line counts and levels from the form's lists only, device names checked.
    for path, reason, status in (("/devices/pi-01/logs?lines=100000", "bad_query", 400),
                                 ("/devices/pi-01/logs?level=TRACE", "bad_query", 400),
                                 ("/devices/%3Cb%3E/logs", "bad_name", 400),
                                 ("/devices/nosuch/logs", "unknown_device", 404)):
        r = fleet.client.get(path)
        assert (r.status_code, r.headers["x-refused-reason"]) == (status, reason), path
    assert len(fake.asked) == 1
    fleet.client.cookies.clear()
    assert fleet.client.get("/devices/pi-01/logs").status_code == 303


def test_device_logs_silent_or_refusing_device_says_why(fleet: Fleet) -> None:
    from edgefleet.server.fleet.device_logs import DeviceLogsError

    fleet.login()
    fleet.cfg.sources.logs = FakeLogs(error=DeviceLogsError(
        "pi-01 did not answer within 5 s (offline, or logs disabled)", reason="timeout"))
    r = fleet.client.get("/devices/pi-01/logs")
    assert r.status_code == 504 and r.headers["x-refused-reason"] == "timeout"
    assert 'id="logs-error"' in r.text and "did not answer within 5 s" in r.text
    assert fleet.metrics.counter("dashboard_logs_failed_timeout") == 1
    # A device's own reason is device text: shown escaped, counted under one name.
    fleet.cfg.sources.logs = FakeLogs(error=DeviceLogsError(
        f"pi-01 refused: {HOSTILE}", reason="<b>weird</b>"))
    r = fleet.client.get("/devices/pi-01/logs")
    assert r.status_code == 502 and r.headers["x-refused-reason"] == "device_refused"
    assert HOSTILE not in r.text
    assert fleet.metrics.counter("dashboard_logs_failed_device_refused") == 1
    # No operator account: said so, nothing asked.
    fleet.cfg.sources.logs = None
    r = fleet.client.get("/devices/pi-01/logs")
    assert r.status_code == 503 and r.headers["x-refused-reason"] == "logs_unavailable"
    assert "--home" in r.text


def test_device_logs_fetches_at_once_are_bounded(tmp_path: Path) -> None:
    import threading

    from edgefleet.device.wire.logs import LogLine

    gate, entered = threading.Event(), threading.Event()

    class Slow(FakeLogs):
        def fetch(self, **kw: object) -> list[object]:
            entered.set()
            gate.wait(10)
            return [LogLine(1.7e9, "INFO", "x", "slow line")]

    f = Fleet(tmp_path)
    f.cfg.max_log_fetches = 1
    f.client = TestClient(create_app(f.cfg, f.metrics), follow_redirects=False)
    f.cfg.sources.logs = Slow()
    try:
        f.login()
        first: dict[str, object] = {}
        t = threading.Thread(target=lambda: first.update(
            r=f.client.get("/devices/pi-01/logs")))
        t.start()
        assert entered.wait(10)
        busy = f.client.get("/devices/pi-02/logs")
        assert busy.status_code == 503 and busy.headers["x-refused-reason"] == "logs_busy"
        assert f.metrics.counter("dashboard_refused_logs_busy") == 1
        gate.set()
        t.join(10)
        assert "slow line" in first["r"].text  # type: ignore[attr-defined]
        assert f.client.get("/devices/pi-02/logs").status_code == 200  # freed again
    finally:
        gate.set()
        f.store.close()


def test_app_metrics_cover_pages_streams_and_refusals(fleet: Fleet) -> None:
    """What `dashboard serve --metrics-port` exports: the app's own Metrics."""
    from edgefleet.device.core.prom_text import families, render

    fleet.login()
    fleet.client.get("/")
    fleet.client.get("/?status=<x>")
    with fleet.client.stream("GET", "/events") as r:
        "".join(r.iter_text())
    snap = fleet.metrics.snapshot()
    assert snap["histograms"]["dashboard_page_ms"]["count"] == 2
    assert snap["gauges"]["dashboard_streams_open"] == 0
    text = render(families(snap))
    assert "edgefleet_dashboard_logins_total 1" in text
    assert "edgefleet_dashboard_refused_bad_query_total 1" in text
    assert "edgefleet_dashboard_page_seconds_count 2" in text
