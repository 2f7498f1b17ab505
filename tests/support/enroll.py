"""Helpers for the enrollment tests: a fleet home, a broker on its files, an inbox client."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.server.fleet.broker import BrokerConfig, MosquittoBroker
from edgefleet.server.fleet.home import FleetHome
from tests.support.telemetry import as_root_extra, raw_client, wait_until


def home_broker(home: FleetHome, workdir: Path) -> MosquittoBroker:
    """A real mosquitto on the home's broker port with its password and ACL files
    (and its pid file where the home's ``broker_pid_file`` says, for the CLI's SIGHUP)."""
    files = home.broker_files()
    pid = home.settings.broker_pid_file
    return MosquittoBroker(workdir, BrokerConfig(
        port=home.settings.broker_port, allow_anonymous=False,
        password_file=files.password_file, acl_file=files.acl_file,
        extra=as_root_extra() + ([f"pid_file {pid}"] if pid else []))).start()


def device_password(bundle: Path) -> str:
    """The MQTT password a bundle folder carries."""
    return (bundle / "mqtt.password").read_text().strip()


class Inbox:
    """A connected client that records every message on its subscriptions."""

    def __init__(self, port: int, user: str, password: str, *topics: str,
                 client_id: str | None = None) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.granted: list[Any] = []
        self._lock = threading.Lock()
        self.client = raw_client(port, client_id or f"inbox-{user}", user, password)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.granted.extend(rcs)
        for t in topics:
            self.client.subscribe(t, qos=1)
        assert wait_until(lambda: len(self.granted) >= len(topics), 5), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def topics(self) -> list[str]:
        """Topics received so far."""
        with self._lock:
            return [t for t, _ in self.messages]

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> None:
        """QoS 1 publish, waiting for the broker's PUBACK (also when the ACL drops it)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        """Disconnect and stop the network loop."""
        self.client.disconnect()
        self.client.loop_stop()
