"""The dashboard in a real browser: `edgefleet dashboard serve` as a process, headless
Chromium through selenium (Debian's chromium + chromium-driver).

Sign-in is required and a wrong password refused; every page loads; a number on the
page moves when the store gets a new report (server-sent events, no reload); the pages
fit a phone's width; acknowledging an alert and approving a retraining request change
the stores and land in the audit log with the dashboard user as actor. Screenshots go
to the test's tmp folder and to build/screenshots (git-ignored).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.server.fleet.audit import AuditLog
from edgefleet.server.fleet.broker import free_port
from edgefleet.server.retrain.policy import Approvals
from edgefleet.server.telemetry.store import open_store
from tests.conftest import BIN, run_cli
from tests.support import cascade
from tests.support.dashboard import HOSTILE, metrics_body, report, seed_fleet
from tests.support.telemetry import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]

device_pkg = cascade.device_pkg
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PASSWORD = "dashboard test password"
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[dict[str, Any]]:
    db, registry, state = tmp_path / "fleet.db", tmp_path / "registry", tmp_path / "dash"
    store = open_store(db)
    rid = seed_fleet(store, registry)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    res = run_cli("dashboard", "user", "add", "alice", "--password-file", str(pw),
                  "--state", str(state))
    assert res.returncode == 0, res.stderr
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen([str(BIN / "edgefleet"), "dashboard", "serve", "--port", str(port),
                             "--db", str(db), "--registry", str(registry), "--state",
                             str(state), "--interval", "0.5"], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), 60, every=0.2), \
            (tmp_path / "dashboard.log").read_text()
        yield {"url": url, "store": store, "registry": registry, "request": rid,
               "shots": tmp_path / "screenshots"}
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
        store.close()


def _healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _shot(driver: Any, d: dict[str, Any], name: str) -> None:
    d["shots"].mkdir(exist_ok=True)
    path = d["shots"] / f"{name}.png"
    driver.save_screenshot(str(path))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / path.name)


def _wait(driver: Any, cond: Any, timeout: float = 30) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # a page the live stream or a redirect replaces between find and read: ask again
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(StaleElementReferenceException,)).until(cond)


def _sign_in(driver: Any, url: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "user").send_keys("alice")
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()


def test_dashboard_in_a_browser(browser: Any, dashboard: dict[str, Any]) -> None:
    from selenium.webdriver.common.by import By

    d, url = dashboard, dashboard["url"]
    # Not signed in: every page sends the browser to the sign-in form.
    browser.get(url + "/alerts")
    assert "/login" in browser.current_url
    _sign_in(browser, url, "wrong password")
    assert browser.find_element(By.ID, "login-error").text == "wrong user or password"
    assert "/login" in browser.current_url
    _sign_in(browser, url, PASSWORD)
    _wait(browser, lambda b: b.current_url.endswith("/alerts"))

    # Pages load; hostile text from the store is shown as text, never run.
    for path, marker in (("/", "pi-01"), ("/devices/pi-01", "History"),
                         ("/rollouts", "Rollouts"), ("/fl", "Federated runs"),
                         ("/alerts", "Retraining approvals")):
        browser.get(url + path)
        assert marker in browser.find_element(By.TAG_NAME, "main").text, path
    browser.get(url + "/")
    assert HOSTILE in browser.find_element(By.ID, "fleet").text
    assert browser.execute_script("return window.pwned === undefined")

    # Live: a new report in the store moves the number on the open page, no reload.
    cell = '[data-live="inferences"][data-device="pi-01"]'
    _wait(browser, lambda b: "updated" in b.find_element(By.ID, "live-status").text)
    assert browser.find_element(By.CSS_SELECTOR, cell).text == "300"
    browser.execute_script("window.notReloaded = true")
    report(d["store"], "pi-01", 10, metrics_body(4321, fallback=21))
    _wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, cell).text == "4321")
    assert browser.execute_script("return window.notReloaded === true")
    _shot(browser, d, "dashboard-fleet")
    browser.get(url + "/devices/pi-01")
    _shot(browser, d, "dashboard-device")

    # Actions: acknowledge the drift alert, approve the retraining request.
    browser.get(url + "/alerts")
    row = browser.find_element(By.CSS_SELECTOR, '[data-alert="pi-01|drift"]')
    row.find_element(By.TAG_NAME, "button").click()
    _wait(browser, lambda b: "acknowledged by dashboard:alice" in b.find_element(
        By.CSS_SELECTOR, '[data-alert="pi-01|drift"]').text)
    req = browser.find_element(By.CSS_SELECTOR, f'[data-request="{d["request"]}"]')
    req.find_element(By.XPATH, ".//button[text()='Approve']").click()
    _wait(browser, lambda b: "approved by dashboard:alice" in b.find_element(
        By.CSS_SELECTOR, f'[data-request="{d["request"]}"]').text)
    _shot(browser, d, "dashboard-alerts")
    [ack] = d["store"].events(prefix="ack.")
    assert (ack["device"], ack["data"]["actor"]) == ("pi-01", "dashboard:alice")
    approvals = Approvals(d["registry"] / "retrain.db")
    try:
        assert approvals.rows()[0]["status"] == "approved"
    finally:
        approvals.db.close()
    audit = AuditLog(d["registry"] / "audit.jsonl")
    audit.verify()
    assert [(e["action"], e["actor"]) for e in audit.entries()] == [
        ("alert.ack", "dashboard:alice"), ("retrain.approved", "dashboard:alice")]

    # A phone: nothing is wider than the screen on any page.
    browser.set_window_size(390, 844)
    for path in ("/", "/devices/pi-01", "/rollouts", "/fl", "/alerts"):
        browser.get(url + path)
        width = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (path, width)
    browser.get(url + "/")
    _shot(browser, d, "dashboard-phone")

    # Signing out ends the session.
    browser.find_element(By.CSS_SELECTOR, "form.logout button").click()
    _wait(browser, lambda b: "/login" in b.current_url)
    browser.get(url + "/")
    assert "/login" in browser.current_url


def test_dashboard_over_tls_sets_a_secure_cookie(tmp_path: Path) -> None:
    """`--tls-cert/--tls-key`: HTTPS only, and the session cookie is Secure."""
    import http.client
    import ssl
    import urllib.parse

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    open_store(tmp_path / "fleet.db").close()
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    state = tmp_path / "dash"
    assert run_cli("dashboard", "user", "add", "alice", "--password-file", str(pw),
                   "--state", str(state)).returncode == 0
    port = free_port()
    proc = subprocess.Popen([str(BIN / "edgefleet"), "dashboard", "serve", "--port", str(port),
                             "--db", str(tmp_path / "fleet.db"), "--state", str(state),
                             "--registry", str(tmp_path / "reg"),
                             "--tls-cert", str(tmp_path / "both.pem"),
                             "--tls-key", str(tmp_path / "key.pem")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def post_login() -> http.client.HTTPResponse | None:
        try:
            c = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
            body = urllib.parse.urlencode({"user": "alice", "password": PASSWORD})
            c.request("POST", "/login", body,
                      {"Content-Type": "application/x-www-form-urlencoded"})
            return c.getresponse()
        except OSError:
            return None
    try:
        assert wait_until(lambda: post_login() is not None, 60, every=0.3)
        r = post_login()
        assert r is not None and r.status == 303
        cookie = r.getheader("set-cookie") or ""
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            plain.request("GET", "/healthz")
            assert plain.getresponse().status != 200
        except (OSError, http.client.HTTPException):
            pass  # a TLS server drops a plain-HTTP request
    finally:
        proc.terminate()
        proc.wait(20)


def _serve(tmp: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "edgefleet"), *args],
                            stdout=(tmp / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)


def test_real_fleet_live_numbers_and_device_logs(browser: Any, tmp_path: Path,
                                                 device_pkg: Path) -> None:
    """Through the real parts only: an enrolled agent process publishes telemetry to
    mosquitto (the fleet's password file and ACL), the `ingest run` process stores it, and
    the open device page's inference count moves over SSE without a reload; the page's
    logs button asks the agent over MQTT with the operator account and shows its lines,
    escaped; a stopped agent gets a clear "did not answer"."""

    from selenium.webdriver.common.by import By

    from edgefleet.device.agent.local_api import request
    from edgefleet.models.core.tasks import get_task
    from edgefleet.server.fleet.enrollment import enroll_device
    from edgefleet.server.fleet.home import FleetHome
    from tests.support import agent_sayer
    from tests.support.enroll import device_password, home_broker

    home = FleetHome.create(tmp_path / "home", broker_port=free_port())
    broker = home_broker(home, tmp_path / "broker")
    bundle = enroll_device(home, "dev1", "line-1", out=tmp_path / "dev1", broker=broker)
    state, db, say = tmp_path / "state", tmp_path / "fleet.db", tmp_path / "say"
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    dash_state = tmp_path / "dash"
    assert run_cli("dashboard", "user", "add", "alice", "--password-file", str(pw),
                   "--state", str(dash_state)).returncode == 0
    on_broker = ("--home", str(home.root), "--broker", f"127.0.0.1:{broker.port}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [_serve(tmp_path, "ingest", "ingest", "run", *on_broker, "--db", str(db))]
    agent = agent_sayer.start(tmp_path, "dev1", device_password(bundle), broker.port,
                              device_pkg)
    procs.append(agent)
    d = {"shots": tmp_path / "screenshots"}
    x = get_task("digits").split().x_test[:5].tolist()
    try:
        store = open_store(db)
        try:
            assert wait_until(lambda: store.device("dev1") is not None, 90), \
                (tmp_path / "ingest.log").read_text()
        finally:
            store.close()
        procs.append(_serve(tmp_path, "dashboard", "dashboard", "serve", *on_broker,
                            "--port", str(port), "--db", str(db), "--state", str(dash_state),
                            "--registry", str(tmp_path / "registry"), "--interval", "0.5",
                            "--logs-timeout", "3"))
        assert wait_until(lambda: _healthy(url), 60, every=0.2), \
            (tmp_path / "dashboard.log").read_text()
        browser.get(url + "/devices/dev1")
        _sign_in(browser, url, PASSWORD)
        _wait(browser, lambda b: b.current_url.endswith("/devices/dev1"), 60)

        # Live: inferences on the agent reach the open page through broker, ingest, store.
        cell = '[data-live="inferences"][data-device="dev1"]'
        _wait(browser, lambda b: "updated" in b.find_element(By.ID, "live-status").text)
        browser.execute_script("window.notReloaded = true")
        sock = state / "agent.sock"
        for i in range(5):
            assert len(request(sock, {"id": i, "input": x})["predictions"]) == 5
        _wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, cell).text == "25", 60)
        assert browser.execute_script("return window.notReloaded === true")

        # Logs: asked of the agent on the click, its lines shown as text.
        agent_sayer.say(say, "hello from the dashboard test", f"{HOSTILE} \x1b[2J")
        assert wait_until(lambda: not say.exists(), 10)
        browser.find_element(By.ID, "fetch-logs").click()
        table = _wait(browser, lambda b: b.find_elements(By.ID, "log-lines"), 30)[0]
        assert "/devices/dev1/logs" in browser.current_url
        text = table.text
        assert "hello from the dashboard test" in text and "agent dev1 started" in text
        assert HOSTILE in text and "\x1b" not in browser.page_source
        assert browser.execute_script("return window.pwned === undefined")
        _shot(browser, d, "dashboard-logs")

        # A device that does not answer: said so, after the bounded wait.
        agent.terminate()
        agent.wait(20)
        browser.find_element(By.ID, "fetch-logs").click()
        err = _wait(browser, lambda b: b.find_elements(By.ID, "logs-error"), 30)[0]
        assert "did not answer" in err.text and err.get_attribute("data-reason") == "timeout"
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.kill()
