"""`edgefleet devices logs` end to end: a real mosquitto with the fleet's ACL, a real agent
process enrolled with its own credentials, the operator CLI as a user runs it."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from edgefleet.device.agent.local_api import request
from edgefleet.device.wire.logs import LogRequest
from edgefleet.models.core.tasks import get_task
from edgefleet.server.fleet.broker import free_port
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from tests.conftest import BIN
from tests.support import agent_sayer
from tests.support.enroll import Inbox, device_password, home_broker
from tests.support.telemetry import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(240)]


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edgefleet"), "devices", "logs", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _lines(res: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert res.returncode == 0, res.stderr + res.stdout
    return [json.loads(x) for x in res.stdout.splitlines() if x.strip()]


def test_operator_fetches_follows_and_devices_cannot(tmp_path: Path,
                                                     digits_package: Path) -> None:
    home = FleetHome.create(tmp_path / "home", broker_port=free_port())
    broker = home_broker(home, tmp_path / "broker")
    bundles = {d: enroll_device(home, d, "g1", out=tmp_path / d, broker=broker)
               for d in ("dev1", "dev2")}
    password = device_password(bundles["dev1"])
    state, say = tmp_path / "state", tmp_path / "say"
    agent = agent_sayer.start(tmp_path, "dev1", password, broker.port, digits_package)
    op = ["--broker", f"127.0.0.1:{broker.port}", "--home", str(home.root), "--json"]
    x = get_task("digits").split().x_test[:2].tolist()
    sock = state / "agent.sock"
    try:
        assert wait_until(sock.exists, 60), "the agent's local API never came up"
        assert len(request(sock, {"id": 1, "input": x})["predictions"]) == 2
        pem = ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnWPa\n"
               "-----END EC PRIVATE KEY-----")
        agent_sayer.say(say, "hello from dev1", f"mqtt login with password={password}",
                        f"the current credential is {password}",
                        "Authorization: Bearer tok3n.abc.def99",
                        f"loaded {pem}".replace("\n", " "))
        assert wait_until(lambda: not say.exists(), 10)
        time.sleep(0.3)  # the watcher logs right after removing the file

        # Fetch: the lines logged by the agent come back, redacted.
        got = _lines(_cli("dev1", "--lines", "500", *op))
        msgs = [str(m["msg"]) for m in got]
        assert "hello from dev1" in msgs
        assert any("agent dev1 started" in m for m in msgs)
        text = "\n".join(msgs)
        assert password not in text and "tok3n.abc.def99" not in text
        assert "MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnWPa" not in text
        assert text.count("[REDACTED]") >= 4
        # --level and --since filter on the device.
        warn = _lines(_cli("dev1", "--level", "WARNING", *op))
        assert warn and all(m["level"] in ("WARNING", "ERROR", "CRITICAL") for m in warn)
        # "hello" is older than --since below, "fresh line" is not, with 12 s for the CLI to
        # start and ask on a loaded machine
        time.sleep(20.0)
        agent_sayer.say(say, "fresh line")
        assert wait_until(lambda: not say.exists(), 10)
        time.sleep(0.3)
        recent = [m["msg"] for m in _lines(_cli("dev1", "--since", "12s", *op))]
        assert "fresh line" in recent and "hello from dev1" not in recent

        # Follow: a line logged after the command started is streamed.
        follow = subprocess.Popen([str(BIN / "edgefleet"), "devices", "logs", "dev1",
                                   "--follow", "--lines", "1", *op],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert follow.stdout is not None
            first = json.loads(follow.stdout.readline())  # the backlog: it is connected
            assert first["msg"]
            agent_sayer.say(say, "streamed while following")
            seen = []
            while True:  # the pytest timeout bounds this loop
                line = json.loads(follow.stdout.readline())
                seen.append(line["msg"])
                if line["msg"] == "streamed while following":
                    break
        finally:
            follow.terminate()
            follow.wait(10)

        # dev2's credentials: the broker drops its request, so the device never answers.
        dev2_pw = tmp_path / "dev2.pw"
        dev2_pw.write_text(device_password(bundles["dev2"]) + "\n")
        res = _cli("dev1", "--broker", f"127.0.0.1:{broker.port}", "--home", str(home.root),
                   "--username", "dev2", "--password-file", str(dev2_pw), "--timeout", "3")
        assert res.returncode != 0 and "did not answer" in res.stderr, res.stderr
        # Hostile and excess requests from the operator account: refused with a reason
        # (the device's token bucket), and the agent goes on.
        inbox = Inbox(broker.port, "operator", home.service_credentials("operator").password,
                      "edgefleet/v1/logs/response/dev1")
        try:
            inbox.publish("edgefleet/v1/logs/request/dev1", b"{" * 5000)
            inbox.publish("edgefleet/v1/logs/request/dev1", b'{"v": 1, "id": [[[[1]]]]}')
            for i in range(10):
                inbox.publish("edgefleet/v1/logs/request/dev1",
                              LogRequest(id=f"flood{i}").encode())
            assert wait_until(lambda: any(b'"rate_limited"' in p for _t, p in inbox.messages),
                              15), inbox.messages
        finally:
            inbox.close()

        # The agent served inference throughout and is still up.
        assert agent.poll() is None
        assert len(request(sock, {"id": 2, "input": x})["predictions"]) == 2
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.kill()
