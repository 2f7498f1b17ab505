"""Enrollment end to end with the operator's and the device's commands: a real SuperLink,
a real mosquitto, a real TUF root; then revocation cuts the device off both."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from edgefleet.device.agent.settings import load_agent_config
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fl.runner import EmbeddedFederation
from edgefleet.server.fleet.broker import free_port
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.superlink import BIN, CONN
from tests.conftest import run_cli
from tests.support.enroll import Inbox, home_broker
from tests.support.telemetry import raw_client, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(300)]


def _json(*args: str, program: str = "edgefleet") -> dict[str, object]:
    res = run_cli(*args, "--json", program=program, timeout=120)
    assert res.returncode == 0, res.stderr + res.stdout
    out: dict[str, object] = json.loads(res.stdout)
    return out


def _node_status(fed: EmbeddedFederation, node_id: int) -> str | None:
    res = fed.conn.flwr("supernode", "ls", CONN, "--format", "json", "-v")
    for n in json.loads(res.stdout[res.stdout.index("{"):])["nodes"]:
        if int(n["node-id"]) == node_id:
            return str(n["status"])
    return None


def _supernode(fed: EmbeddedFederation, name: str, cfg_path: Path) -> subprocess.Popen[bytes]:
    cfg = load_agent_config(cfg_path).fl
    assert cfg.root_certificates and cfg.auth_private_key
    return fed._spawn(name, [  # reuse its logging and process-group handling
        str(BIN / "flower-supernode"), "--superlink", cfg.superlink, "--port", str(free_port()),
        "--root-certificates", str(cfg.root_certificates),
        "--auth-supernode-private-key", str(cfg.auth_private_key)], fed.work / name)


def test_enroll_install_doctor_publish_then_revoke(tmp_path: Path,
                                                   digits_package: Path) -> None:
    reg = tmp_path / "registry"
    root = Path(str(_json("keys", "init", "--registry", str(reg))["root"]))
    with EmbeddedFederation(tmp_path / "fl", devices=0, secure=True) as fed:
        assert fed.certs is not None
        home_dir = tmp_path / "home"
        _json("fleet", "init", "--home", str(home_dir), "--broker",
              f"127.0.0.1:{free_port()}", "--broker-pid-file", str(tmp_path / "mosq.pid"),
              "--superlink", f"127.0.0.1:{fed.port}", "--superlink-ca", str(fed.certs.ca),
              "--metadata-url", "http://127.0.0.1:9/metadata/", "--targets-url",
              "http://127.0.0.1:9/targets/", "--trusted-root", str(root))
        home = FleetHome(home_dir)
        broker = home_broker(home, tmp_path / "broker")
        try:
            # Operator: enroll (the SuperNode key is registered on the SuperLink now).
            bundle = tmp_path / "dev1.tar.gz"
            out = _json("devices", "enroll", "dev1", "--group", "g1", "--out", str(bundle),
                        "--home", str(home_dir))
            device = out["device"]
            assert isinstance(device, dict) and device["fl_state"] == "registered"
            node_id = int(device["node_id"])
            assert _node_status(fed, node_id) == "registered"
            assert stat.S_IMODE(bundle.stat().st_mode) == 0o600

            # Device: install with safe modes; doctor accepts the result.
            state = tmp_path / "state"
            cfg_path = Path(str(_json("enroll", str(bundle), "--state-dir", str(state),
                                      "--config-out", str(tmp_path / "etc" / "agent.toml"),
                                      "--model", str(digits_package),
                                      program="edgefleet-agent")["config"]))
            for d in (state, state / "keys"):
                assert stat.S_IMODE(d.stat().st_mode) == 0o700
            keys = sorted(p.name for p in (state / "keys").iterdir())
            assert keys == ["app-trust.yaml", "mqtt.password", "node.key", "root.json",
                            "sample-store.key", "superlink-ca.pem"]
            assert all(stat.S_IMODE((state / "keys" / k).stat().st_mode) == 0o600 for k in keys)
            assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
            assert (state / "keys" / "mqtt.password").read_text().strip() not in \
                cfg_path.read_text()
            # doctor connects for real: broker (as dev1) and SuperLink (TLS) pass; no
            # registry serves http://127.0.0.1:9, and the doctor says so.
            res = run_cli("doctor", "-c", str(cfg_path), "--json", program="edgefleet-agent")
            doctor = json.loads(res.stdout)
            failed = {c["name"]: c["detail"] for c in doctor["checks"] if not c["ok"]}
            assert res.returncode == 1 and list(failed) == ["registry"], doctor

            # The installed credentials publish telemetry that the ingest account reads.
            cfg = load_agent_config(cfg_path)
            ingest = Inbox(broker.port, "ingest", home.service_credentials("ingest").password,
                           "edgefleet/v1/+/+")
            pub = TelemetryPublisher("dev1", cfg.mqtt, Spool(tmp_path / "spool.db"),
                                     metrics=Metrics()).start()
            try:
                pub.publish("event", {"kind": "hello"})
                assert pub.drain(10)
                assert wait_until(lambda: "edgefleet/v1/dev1/event" in ingest.topics(), 10)
            finally:
                pub.stop()
                ingest.close()

            # Its SuperNode key is accepted: the node comes online.
            _supernode(fed, "sn-before", cfg_path)
            assert wait_until(lambda: _node_status(fed, node_id) == "online", 60, 1.0), \
                fed.log_tail("sn-before")
            fed.kill("sn-before")

            # Operator: revoke. Broker (SIGHUP through the pid file) and SuperLink refuse it.
            out = _json("devices", "revoke", "dev1", "--home", str(home_dir))
            assert isinstance(out["device"], dict) and out["device"]["fl_state"] == "unregistered"
            password = cfg.mqtt.secret()

            def refused() -> bool:
                try:
                    raw_client(broker.port, "dev1-late", "dev1", password).disconnect()
                except ConnectionRefusedError:
                    return True
                return False

            assert wait_until(refused, 10, 0.2), "broker still accepts the revoked device"
            assert _node_status(fed, node_id) == "unregistered"
            late = _supernode(fed, "sn-after", cfg_path)
            assert wait_until(lambda: late.poll() is not None, 90, 0.5), \
                "SuperLink kept a revoked SuperNode"
            assert late.returncode != 0
            assert "Failed to activate SuperNode" in fed.log_tail("sn-after", 40)
            listed = _json("devices", "ls", "--home", str(home_dir))["devices"]
            assert isinstance(listed, list) and listed[0]["active"] is False
        finally:
            broker.kill()


def test_reenrollment_and_revocation_wipe_the_sample_store(tmp_path: Path,
                                                           digits_package: Path) -> None:
    """Samples belong to one enrollment: installing a bundle again wipes them (and makes a
    new key); a running agent whose credentials the broker refuses after a revocation
    wipes its store."""
    import numpy as np

    from edgefleet.device.core.process import ProcessGroup
    from edgefleet.device.data.store import SampleStore, load_key
    from edgefleet.models.core.tasks import get_task
    from tests.conftest import BIN

    fed = EmbeddedFederation(tmp_path / "fl", devices=0, secure=True).__enter__()
    assert fed.certs is not None
    root = str(_json("keys", "init", "--registry", str(tmp_path / "registry"))["root"])
    home_dir = tmp_path / "home"
    _json("fleet", "init", "--home", str(home_dir), "--broker", f"127.0.0.1:{free_port()}",
          "--broker-pid-file", str(tmp_path / "mosq.pid"), "--superlink",
          f"127.0.0.1:{fed.port}", "--superlink-ca", str(fed.certs.ca), "--metadata-url",
          "http://127.0.0.1:9/metadata/",
          "--targets-url", "http://127.0.0.1:9/targets/", "--trusted-root", root)
    home = FleetHome(home_dir)
    broker = home_broker(home, tmp_path / "broker")
    procs = ProcessGroup(tmp_path / "logs")
    state = tmp_path / "state"
    cfg_path = tmp_path / "agent.toml"
    local = tmp_path / "local.toml"
    local.write_text("[fl]\nenabled = false\n[updates]\nenabled = false\n"
                     "[telemetry]\ninterval_s = 0.5\n[mqtt]\nbackoff_base = 0.05\n"
                     "backoff_cap = 0.5\n")
    split = get_task("digits").split()
    npz = tmp_path / "pilot.npz"
    np.savez(npz, x=split.x_train[:30], y=split.y_train[:30])

    def enroll_and_import() -> bytes:
        _json("enroll", str(bundle), "--state-dir", str(state), "--config-out", str(cfg_path),
              "--model", str(digits_package), program="edgefleet-agent")
        key = (state / "keys" / "sample-store.key").read_bytes()
        out = _json("data", "import", str(npz), "-c", str(cfg_path), "-c", str(local),
                    program="edgefleet-agent")
        assert out["stored"] == 30
        return key

    def stored() -> int:
        key = state / "keys" / "sample-store.key"
        with SampleStore(state / "data" / "samples.db",
                         key=load_key(key) if key.exists() else None) as st:
            return st.count()

    try:
        bundle = tmp_path / "dev1.tar.gz"
        _json("devices", "enroll", "dev1", "--group", "g1", "--out", str(bundle),
              "--home", str(home_dir))
        first_key = enroll_and_import()
        second_key = enroll_and_import()  # re-enrollment: the 30 samples went first
        assert first_key != second_key and stored() == 30
        _json("enroll", str(bundle), "--state-dir", str(state), "--config-out", str(cfg_path),
              "--model", str(digits_package), program="edgefleet-agent")
        assert stored() == 0
        out = _json("data", "import", str(npz), "-c", str(cfg_path), "-c", str(local),
                    program="edgefleet-agent")
        assert out["stored"] == 30

        procs.start("agent", [str(BIN / "edgefleet-agent"), "run", "-c", str(cfg_path),
                              "-c", str(local)])
        assert wait_until((state / ".broker-accepted").exists, 30, 0.2), \
            procs.tail("agent", 20)
        assert stored() == 30
        _json("devices", "revoke", "dev1", "--home", str(home_dir))
        # The broker keeps a live session; the revoked device learns at its next connect.
        broker.kill()
        broker = home_broker(home, tmp_path / "broker2")
        assert wait_until(lambda: stored() == 0, 30, 0.2), procs.tail("agent", 20)
        assert "revoked; sample store wiped (30 samples)" in \
            (tmp_path / "logs" / "agent.log").read_text()
        assert procs.alive("agent")
    finally:
        procs.stop_all(20)
        broker.kill()
        fed.stop()
