"""A device enrolled without a model waits for one, then serves the first that verifies.

`edgefleet server up` runs the broker (TLS for devices), the HTTPS registry and the
ingest from a fleet home; an agent installed from its bundle without `--model` starts
(it does not exit), reports "waiting for an update" in its telemetry and refuses
predictions; the operator pushes a package and rolls it out with nothing but the home
(`--home` finds registry, broker and the operator's password); the agent installs it,
serves it, and `fleet ls` shows it by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.agent.local_api import request
from edgefleet.device.core.process import Child
from edgefleet.server.fleet.enrollment import enroll_device
from tests.conftest import BIN, run_cli
from tests.support.fleet_server import make_home, reachable_broker_dir  # noqa: F401
from tests.support.telemetry import wait_until

pytestmark = [pytest.mark.usefixtures("reachable_broker_dir"), pytest.mark.slow,
              pytest.mark.e2e, pytest.mark.timeout(420)]


def _predict(sock: Path, x: list[float]) -> dict[str, object]:
    return request(sock, {"id": 1, "input": x}, timeout=10)


def test_agent_without_model_waits_then_serves(tmp_path: Path, digits_package: Path) -> None:
    home = make_home(tmp_path)
    env = {"EDGEFLEET_HOME": str(home.root)}
    up = run_cli("server", "up", env=env, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    agent: Child | None = None
    try:
        bundle = enroll_device(home, "pi-01", out=tmp_path / "bundle")
        state = tmp_path / "dev"
        cfg = install_bundle(bundle, state, overrides={
            "telemetry": {"interval_s": 1.0}, "api": {"socket": str(tmp_path / "a.sock")}})
        agent = Child.start("agent", [str(BIN / "edgefleet-agent"), "run", "-c", str(cfg)],
                            log_path=tmp_path / "agent.log")

        def store(*args: str) -> dict[str, object]:
            r = run_cli(*args, "--json", env=env)
            return json.loads(r.stdout) if r.returncode == 0 else {}

        def waiting() -> bool:
            shown = store("fleet", "show", "pi-01")
            events = shown.get("events", [])
            return any("waiting_for_update" in str(e.get("kind")) for e in events)  # type: ignore[union-attr]

        assert wait_until(waiting, 60, every=1.0), (tmp_path / "agent.log").read_text()[-2000:]
        assert agent.alive(), "the agent must not exit without a model"
        doc = run_cli("doctor", "-c", str(cfg), "--json", program="edgefleet-agent")
        assert doc.returncode == 0, doc.stdout
        refused = _predict(tmp_path / "a.sock", [0.0] * 64)
        assert "waiting for an update" in json.dumps(refused)

        pushed = store("registry", "push", str(digits_package))
        assert pushed, "registry push --home failed"
        ref = f"{pushed['name']}@{pushed['version']}"
        out = run_cli("rollout", ref, "--devices", "pi-01", "--json", env=env)
        assert out.returncode == 0, out.stderr

        def serving() -> bool:
            rows = store("fleet", "ls").get("devices", [])
            return any(r["device"] == "pi-01" and r["model_version"] == pushed["version"]
                       for r in rows)  # type: ignore[union-attr]

        assert wait_until(serving, 120, every=1.0), (tmp_path / "agent.log").read_text()[-2000:]
        answer = _predict(tmp_path / "a.sock", [0.0] * 64)
        assert "label" in json.dumps(answer), answer
        assert f"{pushed['name']}@{pushed['version']}" in run_cli("fleet", "ls", env=env).stdout
    finally:
        if agent is not None:
            agent.stop(20)
        run_cli("server", "down", env=env, timeout=90)
