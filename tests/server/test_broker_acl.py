"""The generated password and ACL files, enforced by a real mosquitto."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.fleet.broker_acl import (
    hash_password,
    render_acl,
    verify_password,
    write_acl,
    write_password_file,
)
from edgefleet.server.telemetry.store import open_store
from tests.support.telemetry import as_root_extra, raw_client, running_ingest, wait_until

USERS = {"dev1": "pw-one", "dev2": "pw-two", "ingest": "pw-ingest"}


def test_hash_matches_mosquitto_format() -> None:
    salt = b"0123456789ab"
    h = hash_password("secret", iterations=101, salt=salt)
    assert h.startswith("$7$101$")
    assert verify_password("secret", h)
    assert not verify_password("Secret", h)
    assert h != hash_password("secret", iterations=101)  # a fresh salt each time


def test_mosquitto_passwd_file_verifies(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    done = subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "dev1", "secret"],
                          capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    encoded = pw.read_text().strip().split(":", 1)[1]
    assert verify_password("secret", encoded)
    assert not verify_password("other", encoded)


def test_bad_names_refused(tmp_path: Path) -> None:
    from edgefleet.device.core.errors import UsageError

    with pytest.raises(UsageError):
        write_password_file(tmp_path / "pw", {"dev/1": "x"})
    with pytest.raises(UsageError):  # a second line in the password file
        write_password_file(tmp_path / "pw", {"dev1\n": "x"})
    with pytest.raises(UsageError):
        render_acl(services=["a b"])


@pytest.fixture
def secured_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    pw = write_password_file(tmp_path / "etc" / "passwd", USERS)
    acl = write_acl(tmp_path / "etc" / "acl")
    assert stat.S_IMODE(pw.stat().st_mode) == 0o600
    assert stat.S_IMODE(acl.stat().st_mode) == 0o600
    broker = MosquittoBroker(tmp_path / "broker", BrokerConfig(
        allow_anonymous=False, password_file=pw, acl_file=acl,
        extra=as_root_extra())).start()
    yield broker
    broker.kill()


def _envelope(device: str, seq: int) -> bytes:
    return json.dumps({"v": 1, "device": device, "boot": "ab" * 8, "seq": seq,
                       "ts": time.time(), "kind": "event", "body": {"kind": "t"}}).encode()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_acl_stops_foreign_topic_at_the_broker(secured_broker: MosquittoBroker,
                                               tmp_path: Path) -> None:
    port = secured_broker.port
    with pytest.raises(ConnectionRefusedError):
        raw_client(port, "dev1", "dev1", "wrong")
    with pytest.raises(ConnectionRefusedError):
        raw_client(port, "anon")

    store = open_store(tmp_path / "fleet.db")
    with running_ingest(store, port, username="ingest", password=USERS["ingest"]) as ing:
        dev1 = raw_client(port, "dev1", "dev1", USERS["dev1"])
        try:
            # A perfect forgery: dev1 publishes dev2's envelope on dev2's topic.
            dev1.publish("edgefleet/v1/dev2/event", _envelope("dev2", 1), qos=1) \
                .wait_for_publish(5)
            dev1.publish("edgefleet/v1/dev1/event", _envelope("dev1", 1), qos=1) \
                .wait_for_publish(5)
        finally:
            dev1.loop_stop()
            dev1.disconnect()
        assert wait_until(lambda: store.message_stats("dev1")["rows"] == 1, 10)
        time.sleep(0.5)
        assert store.message_stats("dev2")["rows"] == 0
        assert ing.stored == 1
        # The forgery never reached the ingest, so it was not even a counted reject.
        assert store.rejects() == {}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_publisher_with_password_through_acl(secured_broker: MosquittoBroker,
                                             tmp_path: Path) -> None:
    store = open_store(tmp_path / "fleet.db")
    with running_ingest(store, secured_broker.port, username="ingest",
                        password=USERS["ingest"]):
        pub = TelemetryPublisher(
            "dev2", MqttConfig(port=secured_broker.port, username="dev2",
                               password=USERS["dev2"]),
            Spool(tmp_path / "spool.db"), metrics=Metrics()).start()
        try:
            for i in range(20):
                pub.publish("event", {"kind": "tick", "i": i})
            assert pub.drain(10)
            assert wait_until(lambda: store.message_stats("dev2")["rows"] == 20, 10)
            assert wait_until(lambda: (store.device("dev2") or {}).get("online") == 1, 5)
        finally:
            pub.stop()
        assert wait_until(lambda: (store.device("dev2") or {}).get("online") == 0, 5)


def test_every_pattern_names_the_client_so_mosquitto_does_not_warn() -> None:
    acl = render_acl(services=["ingest"], groups={"dev1": "g1", "dev2": "default"})
    patterns = [line for line in acl.splitlines() if line.startswith("pattern ")]
    assert patterns and all("%u" in p or "%c" in p for p in patterns), patterns
    for device in ("dev1", "dev2"):  # the fleet-wide assignment is still readable
        block = acl.split(f"user {device}\n", 1)[1].split("\n\n", 1)[0]
        assert "topic read edgefleet/v1/update/assign/fleet" in block
