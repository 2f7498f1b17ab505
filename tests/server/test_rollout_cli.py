"""``edgefleet rollout/promote/rollback`` publish retained assignments on a real mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import run_cli
from tests.support.updates import make_registry, package_version

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _signed_part(payload: bytes) -> Any:
    """The signed part of a director-signed assignment (what it assigns), else the JSON."""
    body = json.loads(payload)
    return body["signed"] if isinstance(body, dict) and body.get("v") == 2 else body


def _retained(port: int, pattern: str, settle: float = 1.0) -> dict[str, Any]:
    got: dict[str, Any] = {}
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.__setitem__(m.topic, _signed_part(m.payload)
                                                     if m.payload else None)
    c.connect("127.0.0.1", port)
    c.subscribe(pattern, qos=1)
    c.loop_start()
    time.sleep(settle)
    c.loop_stop()
    c.disconnect()
    return got


def test_rollout_promote_rollback_cli(tmp_path: Path, digits_package: Path,
                                      mosquitto: Any) -> None:
    reg = make_registry(tmp_path / "registry")
    reg.push(package_version(digits_package, tmp_path / "p1", "1.0.0"))
    reg.close()
    env = {"EDGEFLEET_REGISTRY": str(tmp_path / "registry"),
           "EDGEFLEET_BROKER": f"127.0.0.1:{mosquitto.port}"}

    res = run_cli("rollout", "digits-mlp@1.0.0", "--devices", "d1,d2", "--json", env=env)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["status"] == "running" and r["devices"] == ["d1", "d2"]
    seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
    assert {t.rsplit("/", 1)[-1]: v["version"] for t, v in seen.items()} == {"d1": "1.0.0",
                                                                              "d2": "1.0.0"}
    assert {v["device"] for v in seen.values()} == {"d1", "d2"}  # signed for each device
    res = run_cli("promote", "digits-mlp", "--json", env=env)
    assert res.returncode == 0, res.stderr
    seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
    # No fleet-wide message: one signed assignment per device the controller knows.
    assert sorted(seen) == ["edgefleet/v1/update/assign/device/d1",
                            "edgefleet/v1/update/assign/device/d2"]
    assert {(v["version"], v["rollout"], v["seq"]) for v in seen.values()} == {
        ("1.0.0", r["id"], 2)}

    res = run_cli("rollback", "digits-mlp", env=env)
    assert res.returncode == 64 and "no earlier fleet version" in res.stderr
    res = run_cli("rollout", "digits-mlp@9.9.9", "--fleet", env=env)
    assert res.returncode == 64 and "not in the registry" in res.stderr
    res = run_cli("rollout", "digits-mlp@1.0.0", "--canary", "10%", env=env)
    assert res.returncode == 64 and "no devices" in res.stderr
    res = run_cli("audit", "verify", "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["entries"] == 4


def test_broker_forms_are_the_one_parsers(tmp_path: Path, digits_package: Path,
                                          mosquitto: Any) -> None:
    """`rollout` and `retrain watch` read --broker with `home_opts.parse_broker`: the
    forms it accepts reach the broker, the ones it refuses fail before anything runs."""
    reg = make_registry(tmp_path / "registry")
    reg.push(package_version(digits_package, tmp_path / "p1", "1.0.0"))
    reg.close()
    env = {"EDGEFLEET_REGISTRY": str(tmp_path / "registry")}
    for i, broker in enumerate((f":{mosquitto.port}", f"localhost:{mosquitto.port}")):
        res = run_cli("rollout", "digits-mlp@1.0.0", "--devices", f"d{i}", "--json",
                      "--broker", broker, env=env)
        assert res.returncode == 0, res.stderr
    seen = _retained(mosquitto.port, "edgefleet/v1/update/assign/#")
    assert sorted(seen) == ["edgefleet/v1/update/assign/device/d0",
                            "edgefleet/v1/update/assign/device/d1"]
    for cmd in (("rollout", "guard", "--once"),
                ("retrain", "watch", "--group", "g", "--db", str(tmp_path / "no.db"),
                 "--once")):
        for bad in ("1884", "[::1", "h:port"):
            res = run_cli(*cmd, "--broker", bad, env=env)
            assert res.returncode == 64, (cmd, bad, res.stderr)
            assert "--broker must be HOST:PORT" in res.stderr
