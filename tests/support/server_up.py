"""A running `edgefleet server up` home with enrolled `edgefleet-agent run` processes,
driven through the `edgefleet` CLI (issue 19's and issue 16's fleet e2e tests)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.agent.local_api import request
from edgefleet.device.agent.settings import load_agent_config
from edgefleet.device.core.process import Child
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.rollout.fleet_view import FleetView
from tests.conftest import BIN, run_cli
from tests.support.enroll import Inbox
from tests.support.fleet_server import make_home
from tests.support.telemetry import wait_until
from tests.support.updates import package_version

__all__ = ["Fleet"]


class Fleet:
    """A running `server up` home, its agents, and the operator's and ingest's eyes."""

    def __init__(self, tmp: Path, package: Path, **server: object) -> None:
        self.tmp, self.package = tmp, package
        self.home: FleetHome = make_home(tmp, **server)
        self.env = {"EDGEFLEET_HOME": str(self.home.root)}
        up = run_cli("server", "up", env=self.env, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        self.agents: dict[str, Child] = {}
        self.configs: dict[str, Path] = {}
        port = self.home.settings.server.broker_local_port
        op = self.home.service_credentials("operator")
        try:
            self.view = FleetView("127.0.0.1", port, username=op.username,
                                  password=op.password)
            ingest = self.home.service_credentials("ingest")
            self.telemetry = Inbox(port, ingest.username, ingest.password,
                                   "edgefleet/v1/+/+", client_id="test-telemetry")
        except BaseException:
            run_cli("server", "down", env=self.env, timeout=120)
            raise

    def cli(self, *args: str) -> dict[str, Any]:
        res = run_cli(*args, "--json", env=self.env, timeout=180)
        assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def enroll(self, name: str, prepare: Callable[[Path], None] | None = None,
               overrides: dict[str, Any] | None = None) -> None:
        """Enroll ``name``, install its bundle (``overrides`` merged into its agent.toml),
        start `edgefleet-agent run` on it."""
        bundle = enroll_device(self.home, name, out=self.tmp / f"bundle-{name}")
        cfg = install_bundle(bundle, self.tmp / name, overrides={
            "telemetry": {"interval_s": 1.0}, "api": {"socket": str(self.sock(name))},
            **(overrides or {})})
        if prepare is not None:
            prepare(cfg)
        self.configs[name] = cfg
        self.agents[name] = Child.start(name, [str(BIN / "edgefleet-agent"), "run",
                                               "-c", str(cfg)],
                                        log_path=self.tmp / f"{name}.log")
        self.wait(lambda: name in self.view.states, f"{name}'s update state")

    def sock(self, name: str) -> Path:
        return self.tmp / f"{name}.sock"

    def push(self, version: str) -> None:
        src = package_version(self.package, self.tmp / "pkgs" / version, version)
        out = self.cli("registry", "push", str(src))
        assert out["version"] == version

    def state(self, name: str) -> dict[str, Any]:
        return dict(self.view.states.get(name, {}))

    def version(self, name: str) -> str | None:
        v = self.state(name).get("version")
        return v if isinstance(v, str) else None

    def events(self, name: str, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.view.events)
                if e.get("device") == name and e.get("event") == kind]

    def counters(self, name: str) -> dict[str, int]:
        """The counters of ``name``'s newest telemetry report."""
        for topic, payload in reversed(list(self.telemetry.messages)):
            if topic == f"edgefleet/v1/{name}/metrics":
                counters: dict[str, int] = json.loads(payload)["body"]["counters"]
                return counters
        return {}

    def spooled_counters(self, name: str) -> dict[str, int]:
        """The counters of the newest report ``name`` spooled (sent or not: a revoked
        device's broker refuses it, so its reports stay in its spool)."""
        db = load_agent_config(self.configs[name]).state_dir / "telemetry-spool.db"
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT payload FROM spool WHERE topic = ? ORDER BY id DESC "
                               "LIMIT 1", (f"edgefleet/v1/{name}/metrics",)).fetchone()
        if row is None:
            return self.counters(name)
        counters: dict[str, int] = json.loads(row[0])["body"]["counters"]
        return counters

    def predict(self, name: str) -> dict[str, Any]:
        reply: dict[str, Any] = request(self.sock(name), {"id": 1, "input": [0.0] * 64},
                                        timeout=10)
        return reply

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 120) -> None:
        assert wait_until(cond, timeout, every=0.5), f"timed out waiting for {what}\n" + \
            "\n".join(f"--- {n}:\n{(self.tmp / f'{n}.log').read_text()[-1500:]}"
                      for n in self.agents)

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop(20)
        self.view.close()
        self.telemetry.close()
        run_cli("server", "down", env=self.env, timeout=120)
