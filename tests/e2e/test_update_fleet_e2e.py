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

import signal
import sqlite3
import time
from pathlib import Path

import pytest

from edgefleet.device.agent.settings import load_agent_config
from edgefleet.server.fleet.keys import KeyRing
from edgefleet.server.fleet.pki import init_certs, issue_client_cert
from edgefleet.server.registry.repository import Registry
from tests.support.fleet_server import reachable_broker_dir  # noqa: F401
from tests.support.server_up import Fleet
from tests.support.updates import HUGE, fast_forward

pytestmark = [pytest.mark.usefixtures("reachable_broker_dir"), pytest.mark.slow,
              pytest.mark.e2e, pytest.mark.timeout(600)]


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
