"""Updates over HTTPS end to end: `edgefleet registry serve --tls-cert`, a real mosquitto,
and the `edgefleet-agent update run` daemon trusting the fleet CA, then a wrong one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.wire.updates import device_topic
from edgefleet.server.fleet.pki import init_certs, issue_server_cert
from edgefleet.server.rollout.fleet_view import FleetView
from tests.support.updates import make_registry, package_version, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent


def _agent(tmp_path: Path, ca: Path, url: str, root: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "edgefleet-agent"), "update", "run", "--device", "pi-01",
         "--state", str(tmp_path / "dev"), "--repo", url, "--root", str(root),
         "--ca-file", str(ca), "--broker", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""


def test_agent_updates_over_https_and_keeps_its_model_under_a_wrong_ca(
        tmp_path: Path, digits_package: Path, mosquitto: Any) -> None:
    fleet = init_certs(tmp_path / "certs")
    cert, key = issue_server_cert(fleet.ca.parent, "registry", ["127.0.0.1"])
    mitm_ca = init_certs(tmp_path / "mitm").ca
    reg = make_registry(tmp_path / "registry")
    for v in ("1.0.0", "1.1.0"):
        reg.push(package_version(digits_package, tmp_path / "p" / v, v))
    root = tmp_path / "root.json"
    root.write_bytes(reg.repo.root_bytes(1))
    reg.close()
    server = subprocess.Popen(
        [str(BIN / "edgefleet"), "registry", "serve", "--port", "0", "--registry",
         str(tmp_path / "registry"), "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "300"})
    view = FleetView("127.0.0.1", mosquitto.port)
    agent: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split(" at ", 1)[1].split()[0]
        assert url.startswith("https://")

        agent = _agent(tmp_path, fleet.ca, url, root, mosquitto.port)
        view.publish(device_topic("pi-01"), json.dumps(
            {"model": "digits-mlp", "version": "1.0.0"}).encode())
        wait_for(lambda: view.states.get("pi-01", {}).get("version") == "1.0.0",
                 what="1.0.0 activated over HTTPS")
        _stop(agent)

        # Restarted trusting another CA (or behind a TLS-intercepting middlebox): the
        # new assignment is refused at the handshake, retried, and 1.0.0 keeps serving.
        view.events.clear()
        restarted = time.time()
        agent = _agent(tmp_path, mitm_ca, url, root, mosquitto.port)
        view.publish(device_topic("pi-01"), json.dumps(
            {"model": "digits-mlp", "version": "1.1.0"}).encode())
        wait_for(lambda: sum(e.get("event") == "rejected" and e.get("reason") == "tls"
                             for e in view.events) >= 2, what="two TLS refusals (one retry)")
        refusal = next(e for e in view.events if e.get("reason") == "tls")
        assert "TLS handshake failed" in refusal["error"] and refusal["target"] == \
            "digits-mlp/1.1.0.tar"
        assert agent.poll() is None
        wait_for(lambda: view.states["pi-01"]["ts"] > refusal["ts"], what="a newer state")
        assert view.states["pi-01"]["ts"] > restarted
        assert view.states["pi-01"]["version"] == "1.0.0"
        _stop(agent)
        agent = None
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(10)
        view.close()
        server.terminate()
        server.wait(10)
