"""Helpers for the telemetry tests: an ingest thread, a raw MQTT client, waiting."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.server.telemetry.ingest import IngestConfig, IngestService
from edgefleet.server.telemetry.store import Store


def wait_until(cond: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(every)
    return cond()


@contextlib.contextmanager
def running_ingest(store: Store, port: int, *, metrics: Metrics | None = None,
                   username: str | None = None, password: str | None = None,
                   **cfg: object) -> Iterator[IngestService]:
    """An :class:`IngestService` on a thread for the duration of the block."""
    conf = IngestConfig(mqtt=MqttConfig(port=port, username=username, password=password,
                                        backoff_base=0.05, backoff_cap=0.5), **cfg)  # type: ignore[arg-type]
    svc = IngestService(store, conf, metrics=metrics or Metrics())
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    assert wait_until(lambda: svc.link.connected, 10), "ingest did not connect"
    time.sleep(0.2)  # let the SUBSCRIBE land
    try:
        yield svc
    finally:
        svc.stop()
        th.join(10)


def raw_client(port: int, client_id: str = "", username: str | None = None,
               password: str | None = None) -> mqtt.Client:
    """A connected paho client (MQTT 5) with its network loop running."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    if username:
        c.username_pw_set(username, password)
    connected = threading.Event()
    rcs: list[object] = []
    c.on_connect = lambda _c, _u, _f, rc, _p: (rcs.append(rc), connected.set())
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(5), "no CONNACK"
    if rcs[0].is_failure:  # type: ignore[attr-defined]
        c.loop_stop()
        raise ConnectionRefusedError(str(rcs[0]))
    return c


def as_root_extra() -> list[str]:
    """mosquitto started as root drops to the ``mosquitto`` user, which cannot read our
    0600 password/ACL files or write the persistence folder of a test: keep it root."""
    return ["user root"] if os.geteuid() == 0 else []
