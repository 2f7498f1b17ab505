"""A device authenticating with a client certificate over TLS; the CN is its ACL identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.telemetry.publisher import TelemetryPublisher
from edgefleet.device.telemetry.spool import Spool
from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.fleet.broker_acl import write_acl
from tests.support.telemetry import as_root_extra, raw_client, wait_until


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_client_certificate_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    dev = ca.issue_cert("dev-tls", common_name="dev-tls")
    dev.cert_chain_pems[0].write_to_path(str(tmp_path / "dev.crt"))
    dev.private_key_pem.write_to_path(str(tmp_path / "dev.key"))
    acl = write_acl(tmp_path / "acl", services=["observer"])
    broker = MosquittoBroker(tmp_path / "broker", BrokerConfig(
        allow_anonymous=True, acl_file=acl, extra=[
            f"cafile {ca_file}", f"certfile {tmp_path / 'server.pem'}",
            f"keyfile {tmp_path / 'server.pem'}", "require_certificate true",
            "use_identity_as_username true", *as_root_extra()])).start()
    try:
        m = Metrics()
        pub = TelemetryPublisher("dev-tls", MqttConfig(
            port=broker.port, ca_file=ca_file, cert_file=tmp_path / "dev.crt",
            key_file=tmp_path / "dev.key", backoff_base=0.05, backoff_cap=0.3),
            Spool(tmp_path / "spool.db"), metrics=m).start()
        try:
            for i in range(10):
                pub.publish("event", {"kind": "tick", "i": i})
            assert pub.drain(10)
            assert m.counter("telemetry_published") == 10
            assert m.counter("telemetry_puback_refused") == 0
        finally:
            pub.stop()
        # Without a client certificate the TLS handshake is refused and nothing is sent.
        m2 = Metrics()
        nocert = TelemetryPublisher("dev-tls", MqttConfig(
            port=broker.port, ca_file=ca_file, backoff_base=0.05, backoff_cap=0.2),
            Spool(tmp_path / "spool2.db"), metrics=m2).start()
        try:
            nocert.publish("event", {"kind": "tick"})
            assert wait_until(lambda: m2.counter("telemetry_connect_errors")
                              + m2.counter("telemetry_disconnects") >= 2, 10)
            assert nocert.spool.count() == 1  # kept for later, not lost
        finally:
            nocert.stop()
        # Plain TCP to the TLS listener is not accepted either.
        with pytest.raises((ConnectionRefusedError, AssertionError, OSError)):
            raw_client(broker.port, "plain")
    finally:
        broker.kill()
