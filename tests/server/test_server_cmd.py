"""``edgefleet server up|status|down|units``: every fleet service from the fleet home.

Real processes on loopback: mosquitto with the generated config (TLS for devices, a
plain loopback listener for services), the HTTPS registry, the ingest and the rollout
guard, each reading its credentials from the home; a device enrolled while the server
runs publishes over TLS and `fleet ls --home` shows it.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.reporter import TelemetryReporter
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.enrollment import enroll_device
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.services import plan, systemd_units, write_mosquitto_conf
from tests.conftest import run_cli
from tests.support.fleet_server import broker_user, make_home, reachable_broker_dir  # noqa: F401
from tests.support.telemetry import wait_until

pytestmark = pytest.mark.usefixtures("reachable_broker_dir")


def test_generated_config_units_and_plan(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    conf = write_mosquitto_conf(home).read_text()
    s = home.settings
    # devices: TLS on the public listener; services: loopback without TLS
    assert f"listener {s.server.broker_local_port} 127.0.0.1\n" in conf
    device_listener = conf.split(f"listener {s.broker_port} 127.0.0.1\n", 1)[1]
    for key in ("cafile", "certfile", "keyfile"):
        assert f"\n{key} " in "\n" + device_listener
    assert "allow_anonymous false" in conf and "password_file" in conf
    user = broker_user()
    if user is not None:  # the broker's user can read what it is given, nobody else
        assert f"user {user}" in conf
        uid = pwd.getpwnam(user).pw_uid
        bdir = home.broker_dir
        for p in (bdir, bdir / "passwd", bdir / "acl", bdir / "broker.key"):
            assert p.stat().st_uid == uid, p
        assert stat.S_IMODE((bdir / "broker.key").stat().st_mode) == 0o600
        # enrolling rewrites the files: they stay the broker's
        enroll_device(home, "pi-01", out=tmp_path / "b1")
        assert (bdir / "passwd").stat().st_uid == uid
    names = [svc.name for svc in plan(home)]
    assert names == ["mosquitto", "registry", "ingest", "rollout-guard"]
    units = systemd_units(home, plan(home))
    assert set(units) == {f"edgefleet-{n}.service" for n in names} | {"edgefleet-server.target"}
    secrets = [home.service_credentials(r).password for r in ("ingest", "operator")]
    for text in units.values():
        assert not any(pw in text for pw in secrets)
    ingest = units["edgefleet-ingest.service"]
    assert f"--home {home.root}" in ingest and "After=network-online.target " \
        "edgefleet-mosquitto.service" in ingest
    assert "StartLimitBurst=6" in ingest and f"append:{home.root}/logs/ingest.log" in ingest


def test_dashboard_runs_when_its_port_is_set_and_someone_may_sign_in(tmp_path: Path) -> None:
    """`[server] dashboard_port`: `server up` runs the dashboard on loopback with the home
    (so it has the operator account for device logs) and its /metrics at base + 5."""
    from edgefleet.device.core.errors import ConfigError
    from edgefleet.server.dashboard.auth import Users

    home = make_home(tmp_path, dashboard_port=8601, metrics_port=9478)
    with pytest.raises(ConfigError, match="dashboard user add"):
        plan(home)
    Users(home.root / "dashboard").add("alice", "a long enough password")
    [dash] = [svc for svc in plan(home) if svc.name == "dashboard"]
    assert dash.argv[-8:] == ["dashboard", "serve", "--home", str(home.root), "--port", "8601",
                              "--metrics-port", "9483"]
    assert dash.port == 8601 and dash.host == "127.0.0.1" and dash.needs_broker
    assert "dashboard" not in [svc.name for svc in plan(make_home(tmp_path / "off"))]


def test_missing_certificate_fails_before_anything_starts(tmp_path: Path) -> None:
    home = make_home(tmp_path, registry=False)
    (home.root / "certs" / "broker.key").unlink()
    res = run_cli("server", "up", "--home", str(home.root), timeout=60)
    assert res.returncode == 78, res.stdout + res.stderr
    assert "certs issue broker" in res.stderr
    assert not (home.root / "run" / "server.pid").exists()


def _status(home: FleetHome) -> dict[str, object]:
    res = run_cli("server", "status", "--json", env={"EDGEFLEET_HOME": str(home.root)})
    out: dict[str, object] = json.loads(res.stdout)
    return out


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_server_up_status_down(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    env = {"EDGEFLEET_HOME": str(home.root)}
    res = run_cli("server", "up", "--json", env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    up = json.loads(res.stdout)
    assert {n: s["state"] for n, s in up["services"].items()} == {
        "mosquitto": "up", "registry": "up", "ingest": "up", "rollout-guard": "up"}
    try:
        assert (home.root / "logs" / "ingest.log").is_file()
        again = run_cli("server", "up", env=env, timeout=60)  # idempotent
        assert again.returncode == 0 and "already" not in again.stderr
        assert json.loads(run_cli("server", "up", "--json", env=env).stdout)["pid"] == up["pid"]

        # A device enrolled while the server runs: the broker reloads (SIGHUP through
        # run/mosquitto.pid) and it publishes over TLS; the ingest stores it in the home.
        bundle = enroll_device(home, "pi-01", out=tmp_path / "pi-01")
        m = Metrics()
        cfg = MqttConfig(host="127.0.0.1", port=home.settings.broker_port,
                         username="pi-01", password_file=bundle / "mqtt.password",
                         ca_file=bundle / "broker-ca.pem")
        pub = TelemetryPublisher("pi-01", cfg, Spool(tmp_path / "spool.db"), metrics=m).start()
        m.set("model_name", "digits-mlp")
        m.set("model_version", "1.0.0")
        m.inc("inferences")
        TelemetryReporter(pub, metrics=m).report()

        def listed() -> list[dict[str, object]]:
            r = run_cli("fleet", "ls", "--json", env=env)
            return json.loads(r.stdout)["devices"] if r.returncode == 0 else []

        try:
            assert wait_until(lambda: any(d["device"] == "pi-01" for d in listed()), 30)
        finally:
            pub.stop()
        table = run_cli("fleet", "ls", env=env).stdout
        assert "digits-mlp@1.0.0" in table

        # the guard reads the registry, the store and the operator account from the home
        g = run_cli("rollout", "guard", "--once", "--json", env=env)
        assert g.returncode == 0, g.stderr

        # a service that dies is restarted (within its budget) and counted
        pid = up["services"]["ingest"]["pid"]
        os.kill(pid, signal.SIGKILL)

        def restarted() -> bool:
            s = _status(home)["services"]["ingest"]  # type: ignore[index]
            return bool(s["restarts"] >= 1 and s["state"] == "up" and s["pid"] != pid)

        assert wait_until(restarted, 30, every=0.5)
    finally:
        down = run_cli("server", "down", env=env, timeout=90)
    assert down.returncode == 0, down.stderr
    st = _status(home)
    assert st["running"] is False
    for svc in up["services"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(svc["pid"], 0)
    assert run_cli("server", "status", env=env).returncode == 1
    assert not (home.root / "run" / "mosquitto.pid").exists()


def test_broker_dir_the_broker_cannot_reach_is_named(tmp_path: Path) -> None:
    if broker_user() is None:
        pytest.skip("needs root and a mosquitto user")
    home = make_home(tmp_path, registry=False, broker_dir=tmp_path / "closed" / "broker")
    (tmp_path / "closed").mkdir(mode=0o700, exist_ok=True)
    res = run_cli("server", "up", "--home", str(home.root), timeout=60)
    assert res.returncode == 78 and "cannot reach" in res.stderr, res.stderr
