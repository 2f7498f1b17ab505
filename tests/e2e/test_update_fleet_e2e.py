"""Issue 19's "done when" through the real parts: `edgefleet server up` (mosquitto with
TLS, the HTTPS registry, the ingest, the rollout guard), devices enrolled from the home
and running `edgefleet-agent run`, every operator step through the `edgefleet` CLI.

* Authenticated downloads: with ``registry_client_auth`` an enrolled agent installs a
  director-signed rollout; after `devices revoke` its next download is refused
  (``client_cert``, counted in its telemetry, "retrying" in its update state) while it
  keeps answering with its model; a certificate from another CA never downloads.
* The rollout guard (`rollout guard`, run by `server up`): a device enrolled after a
  fleet-wide rollout gets a signed assignment and installs it; an assignment nearing
  its expiry is re-signed and the device takes it without downloading anything.
* Fast-forward recovery: an attacker with the timestamp key pushes it to 10**6, the
  agents believe it; `keys rotate timestamp --recover-fast-forward` restarts it at 1;
  the agents reset the floor (event ``floors_reset``, counter) and install the next
  rollout.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgefleet.device.agent.enroll import install_bundle
from edgefleet.device.agent.local_api import request
from edgefleet.device.agent.settings import load_agent_config
from edgefleet.device.core.process import Child
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.fleet.pki import init_certs, issue_client_cert
from edgefleet.server.registry.repository import Registry
from edgefleet.server.rollout.fleet_view import FleetView
from tests.conftest import BIN, run_cli
from tests.support.enroll import Inbox
from tests.support.fleet_server import make_home, reachable_broker_dir  # noqa: F401
from tests.support.telemetry import wait_until
from tests.support.updates import HUGE, fast_forward, package_version

pytestmark = [pytest.mark.usefixtures("reachable_broker_dir"), pytest.mark.slow,
              pytest.mark.e2e, pytest.mark.timeout(600)]


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

    def enroll(self, name: str, prepare: Callable[[Path], None] | None = None) -> None:
        """Enroll ``name``, install its bundle, start `edgefleet-agent run` on it."""
        bundle = enroll_device(self.home, name, out=self.tmp / f"bundle-{name}")
        cfg = install_bundle(bundle, self.tmp / name, overrides={
            "telemetry": {"interval_s": 1.0}, "api": {"socket": str(self.sock(name))}})
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


def test_mutual_tls_enrolled_device_installs_revoked_and_foreign_ones_cannot(
        tmp_path: Path, digits_package: Path) -> None:
    fleet = Fleet(tmp_path, digits_package, registry_client_auth=True)
    try:
        other_ca = init_certs(tmp_path / "other-ca")

        def foreign_certificate(cfg: Path) -> None:
            """pi-03's key pair replaced by one of another CA, with the same name."""
            u = load_agent_config(cfg).updates
            assert u.client_cert is not None and u.client_key is not None
            issue_client_cert(other_ca.ca.parent, "pi-03", u.client_cert, u.client_key)

        for name in ("pi-01", "pi-02"):
            fleet.enroll(name)
        fleet.enroll("pi-03", prepare=foreign_certificate)
        assert "pi-03" in fleet.home.registry_clients_file.read_text()  # listed, but...

        fleet.push("1.0.0")
        fleet.cli("rollout", "digits-mlp@1.0.0", "--fleet")
        fleet.wait(lambda: fleet.version("pi-01") == fleet.version("pi-02") == "1.0.0",
                   "pi-01 and pi-02 on 1.0.0")
        for name in ("pi-01", "pi-02"):  # director-signed: the device took a seq
            assert (fleet.state(name).get("assign_seq") or 0) >= 1
        # ...the handshake refuses another CA's certificate: pi-03 never downloads.
        fleet.wait(lambda: fleet.counters("pi-03").get("update_rejected_client_cert", 0) >= 1,
                   "pi-03's client_cert refusal in its telemetry")
        assert fleet.version("pi-03") is None
        assert fleet.events("pi-03", "rejected")[0]["reason"] == "client_cert"
        assert fleet.state("pi-03")["last"] == {"target": "digits-mlp/1.0.0.tar",
                                                "outcome": "retrying", "reason": "client_cert"}
        assert not fleet.counters("pi-03").get("update_activated")

        # Revoke pi-02 while an assignment is on its way: the broker cuts its MQTT
        # sessions at once (so it is paused to receive the rollout first, as a device
        # does whose revocation lands mid-update), and its certificate leaves the
        # registry's list; its next download is refused.
        fleet.push("1.1.0")
        fleet.agents["pi-02"].send(signal.SIGSTOP)
        try:
            fleet.cli("rollout", "digits-mlp@1.1.0", "--fleet")
            fleet.wait(lambda: fleet.version("pi-01") == "1.1.0", "pi-01 on 1.1.0")
            fleet.cli("devices", "revoke", "pi-02")
        finally:
            fleet.agents["pi-02"].send(signal.SIGCONT)
        assert "pi-02" not in fleet.home.registry_clients_file.read_text()
        fleet.wait(lambda: fleet.spooled_counters("pi-02").get(
            "update_rejected_client_cert", 0) >= 1, "pi-02's client_cert refusal in its "
            "telemetry (spooled: the broker refuses it now)")
        log = (tmp_path / "pi-02.log").read_text()
        assert "403" in log and "'reason': 'client_cert'" in log
        assert fleet.agents["pi-02"].alive()
        answer = fleet.predict("pi-02")  # still answering with its model
        assert len(answer["predictions"]) == 1 and "label" in answer["predictions"][0], answer
        assert fleet.spooled_counters("pi-02").get("update_activated") == 1
    finally:
        fleet.close()


def test_guard_signs_for_newcomers_and_expiry_then_fast_forward_recovery(
        tmp_path: Path, digits_package: Path) -> None:
    fleet = Fleet(tmp_path, digits_package)
    try:
        fleet.enroll("pi-01")
        fleet.push("1.0.0")
        fleet.cli("rollout", "digits-mlp@1.0.0", "--fleet")
        fleet.wait(lambda: fleet.version("pi-01") == "1.0.0", "pi-01 on 1.0.0")

        # A device enrolled after the fleet-wide rollout: the guard's newcomer pass.
        fleet.enroll("pi-02")
        fleet.wait(lambda: fleet.version("pi-02") == "1.0.0", "the newcomer pi-02 on 1.0.0")
        fleet.wait(lambda: (fleet.state("pi-02").get("assign_seq") or 0) >= 1,
                   "pi-02 took a director seq")

        # An assignment past half its life is re-signed by the guard; the device takes
        # the new seq and downloads nothing (it is current).
        db = fleet.home.registry_path / "rollouts.db"
        seq = fleet.state("pi-01")["assign_seq"]
        fetched = fleet.counters("pi-01").get("update_activated", 0)
        assert fetched == 1
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE director_assignments SET expires = ? WHERE device = ?",
                         (int(time.time()) + 60, "pi-01"))
        fleet.wait(lambda: (fleet.state("pi-01").get("assign_seq") or 0) > seq
                   and fleet.state("pi-01").get("last", {}).get("outcome") == "current",
                   "pi-01 took the re-signed assignment")
        with sqlite3.connect(db) as conn:
            (expires,) = conn.execute("SELECT expires FROM director_assignments WHERE "
                                      "device = ?", ("pi-01",)).fetchone()
        assert expires > time.time() + 24 * 3600
        assert fleet.state("pi-01")["last"] == {"target": "digits-mlp/1.0.0.tar",
                                                "outcome": "current"}
        assert fleet.version("pi-01") == "1.0.0"

        # The attacker holds the timestamp key and pushes it to 10**6; the next rollout
        # carries it and the devices raise their floors there.
        reg = Registry(fleet.home.registry_path, KeyRing(fleet.home.registry_path / "keys"))
        try:
            fast_forward(reg.repo, "timestamp")
        finally:
            reg.close()
        fleet.push("1.1.0")
        fleet.cli("rollout", "digits-mlp@1.1.0", "--fleet")
        for name in ("pi-01", "pi-02"):
            fleet.wait(lambda n=name: fleet.version(n) == "1.1.0", f"{name} on 1.1.0")
            assert fleet.state(name)["highest_seen"]["timestamp"] >= HUGE
        fleet.wait(lambda: fleet.counters("pi-01").get("update_activated") == fetched + 1,
                   "pi-01's activations counted: 1.0.0 and 1.1.0, no re-download")

        # Recovery as the operator runs it: new timestamp key in a new root, restart at 1.
        out = fleet.cli("keys", "rotate", "timestamp", "--recover-fast-forward")
        assert out["recover_fast_forward"] is True
        fleet.push("1.2.0")
        fleet.cli("rollout", "digits-mlp@1.2.0", "--fleet")
        for name in ("pi-01", "pi-02"):
            fleet.wait(lambda n=name: fleet.version(n) == "1.2.0", f"{name} on 1.2.0")
            floors = fleet.state(name)["highest_seen"]
            assert floors["timestamp"] < HUGE and floors["root"] >= 2, floors
            fleet.wait(lambda n=name: bool(fleet.events(n, "floors_reset")),
                       f"{name}'s floors_reset event")
            reset = fleet.events(name, "floors_reset")
            assert len(reset) == 1 and reset[0]["rotated"] == ["timestamp"]
            assert reset[0]["reset"] == ["snapshot", "timestamp"]
            fleet.wait(lambda n=name: fleet.counters(n).get("update_floors_reset") == 1,
                       f"{name}'s update_floors_reset counter")
            answer = fleet.predict(name)
            assert "label" in answer["predictions"][0], answer
    finally:
        fleet.close()
