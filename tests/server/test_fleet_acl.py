"""The fleet home's broker files, enforced by a real mosquitto: every flow the parts use
works, and a device can reach nothing that is not its own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.server.fleet.broker import MosquittoBroker, free_port
from edgefleet.server.fleet.enrollment import enroll_device, revoke_device
from edgefleet.server.fleet.home import FleetHome
from tests.support.enroll import Inbox, device_password, home_broker
from tests.support.telemetry import raw_client, wait_until

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[FleetHome, MosquittoBroker, dict[str, str]]]:
    home = FleetHome.create(tmp_path / "home", broker_port=free_port())
    broker = home_broker(home, tmp_path / "broker")
    pw = {}
    for name, group in (("dev1", "g1"), ("dev2", "g2")):
        pw[name] = device_password(enroll_device(home, name, group, out=tmp_path / name,
                                                 broker=broker))
    for role in ("ingest", "scorer", "operator"):
        pw[role] = home.service_credentials(role).password
    yield home, broker, pw
    broker.kill()


def _settle() -> None:
    time.sleep(0.5)  # QoS 1 PUBACKs are in; give the broker time to route


def test_telemetry_own_topics_only(fleet: tuple[FleetHome, MosquittoBroker, dict[str, str]]
                                   ) -> None:
    _home, broker, pw = fleet
    port = broker.port
    ingest = Inbox(port, "ingest", pw["ingest"], "edgefleet/v1/+/+")
    snoop = Inbox(port, "dev2", pw["dev2"], "#", "edgefleet/v1/dev1/#", client_id="dev2-snoop")
    dev1 = Inbox(port, "dev1", pw["dev1"])
    try:
        for kind in ("metrics", "event", "status"):
            dev1.publish(f"edgefleet/v1/dev1/{kind}")
        dev1.publish("edgefleet/v1/dev2/metrics")  # forging dev2
        dev1.publish("edgefleet/v1/ingest/metrics")
        assert wait_until(lambda: len(ingest.topics()) >= 3, 5)
        _settle()
        assert sorted(ingest.topics()) == ["edgefleet/v1/dev1/event", "edgefleet/v1/dev1/metrics",
                                           "edgefleet/v1/dev1/status"]
        # mosquitto grants the subscription to '#', but delivers nothing dev2 may not read.
        assert snoop.topics() == []
    finally:
        for c in (ingest, snoop, dev1):
            c.close()


def test_scoring_request_and_response(fleet: tuple[FleetHome, MosquittoBroker, dict[str, str]]
                                      ) -> None:
    _home, broker, pw = fleet
    port = broker.port
    scorer = Inbox(port, "scorer", pw["scorer"], "$share/scorers/edgefleet/v1/score/request/+")
    dev1 = Inbox(port, "dev1", pw["dev1"], "edgefleet/v1/score/response/dev1")
    dev2 = Inbox(port, "dev2", pw["dev2"], "edgefleet/v1/score/response/+",
                 "edgefleet/v1/score/request/+")
    try:
        dev1.publish("edgefleet/v1/score/request/dev1", b"req")
        dev2.publish("edgefleet/v1/score/request/dev1", b"forged")
        assert wait_until(lambda: len(scorer.topics()) >= 1, 5)
        scorer.publish("edgefleet/v1/scorer/s1/status", b"{}", retain=True)
        scorer.publish("edgefleet/v1/score/response/dev1", b"reply")
        assert wait_until(lambda: dev1.messages == [("edgefleet/v1/score/response/dev1",
                                                     b"reply")], 5)
        _settle()
        assert scorer.messages == [("edgefleet/v1/score/request/dev1", b"req")]
        assert dev2.topics() == []  # neither dev1's requests nor its replies
    finally:
        for c in (scorer, dev1, dev2):
            c.close()


def test_update_assignments_and_states(fleet: tuple[FleetHome, MosquittoBroker,
                                                    dict[str, str]]) -> None:
    _home, broker, pw = fleet
    port = broker.port
    root = "edgefleet/v1/update"
    op = Inbox(port, "operator", pw["operator"], f"{root}/state/+", f"{root}/event/+",
               f"{root}/assign/#")
    dev1 = Inbox(port, "dev1", pw["dev1"], f"{root}/assign/device/dev1",
                 f"{root}/assign/group/g1", f"{root}/assign/fleet")
    dev2 = Inbox(port, "dev2", pw["dev2"], f"{root}/assign/device/dev1",
                 f"{root}/assign/group/g1", f"{root}/state/+")
    try:
        for t in ("device/dev1", "group/g1", "fleet"):
            op.publish(f"{root}/assign/{t}", b"a", retain=True)
        dev1.publish(f"{root}/state/dev1", b"s", retain=True)
        dev1.publish(f"{root}/event/dev1", b"e")
        dev1.publish(f"{root}/state/dev2", b"forged")
        dev1.publish(f"{root}/assign/fleet", b"hijack", retain=True)
        assert wait_until(lambda: len(dev1.topics()) >= 3, 5)
        assert wait_until(lambda: {f"{root}/state/dev1", f"{root}/event/dev1"}
                          <= set(op.topics()), 5)
        _settle()
        assert sorted(dev1.topics()) == sorted(f"{root}/assign/{t}" for t in
                                               ("device/dev1", "group/g1", "fleet"))
        assert (f"{root}/assign/fleet", b"hijack") not in op.messages
        assert f"{root}/state/dev2" not in op.topics()
        assert dev2.topics() == []
    finally:
        for c in (op, dev1, dev2):
            c.close()


def test_log_requests_only_from_the_operator_answers_only_from_the_device(
        fleet: tuple[FleetHome, MosquittoBroker, dict[str, str]]) -> None:
    _home, broker, pw = fleet
    port = broker.port
    root = "edgefleet/v1/logs"
    op = Inbox(port, "operator", pw["operator"], f"{root}/response/+")
    dev1 = Inbox(port, "dev1", pw["dev1"], f"{root}/request/dev1")
    dev2 = Inbox(port, "dev2", pw["dev2"], f"{root}/request/+", f"{root}/response/+", "#")
    others = [Inbox(port, role, pw[role], f"{root}/#") for role in ("ingest", "scorer")]
    try:
        op.publish(f"{root}/request/dev1", b"op-asks")
        dev2.publish(f"{root}/request/dev1", b"dev2-asks")  # a device may not ask
        for role, c in zip(("ingest", "scorer"), others, strict=True):
            c.publish(f"{root}/request/dev1", role.encode())  # nor may other services
        assert wait_until(lambda: len(dev1.messages) >= 1, 5)
        dev1.publish(f"{root}/response/dev1", b"dev1-answers")
        dev1.publish(f"{root}/response/dev2", b"forged")  # nor answer for another
        assert wait_until(lambda: len(op.messages) >= 1, 5)
        _settle()
        assert dev1.messages == [(f"{root}/request/dev1", b"op-asks")]
        assert op.messages == [(f"{root}/response/dev1", b"dev1-answers")]
        assert dev2.topics() == []  # neither dev1's requests nor its logs
        assert all(c.topics() == [] for c in others)
    finally:
        for c in (op, dev1, dev2, *others):
            c.close()


def test_revoke_cuts_the_device_off(tmp_path: Path,
                                    fleet: tuple[FleetHome, MosquittoBroker, dict[str, str]]
                                    ) -> None:
    home, broker, pw = fleet
    dev1 = Inbox(broker.port, "dev1", pw["dev1"])
    gone: list[object] = []
    dev1.client.on_disconnect = lambda *a: gone.append(a)
    revoke_device(home, "dev1", broker=broker)
    # The reload disconnects the live session, and a new CONNECT is refused.
    assert wait_until(lambda: bool(gone), 10), "revoked device stayed connected"
    dev1.client.loop_stop()
    with pytest.raises(ConnectionRefusedError, match=r"[Nn]ot authorized|[Bb]ad user"):
        raw_client(broker.port, "dev1-again", "dev1", pw["dev1"])
    raw_client(broker.port, "dev2-still", "dev2", pw["dev2"]).disconnect()
    assert [r.name for r in home.devices.active()] == ["dev2"]
    assert "dev1" not in home.broker_files().password_file.read_text()
