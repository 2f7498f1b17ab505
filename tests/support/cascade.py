"""Fixtures and helpers for the hybrid cascade: packages, scorers, spies on the broker.

Import the fixtures into a test module (``from tests.support.cascade import ...``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.wire.scoring import scorer_status_topic
from edgefleet.server.fleet.broker import MosquittoBroker
from edgefleet.server.scorer import Scorer, ScorerConfig

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def device_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits device package, ONNX only (fp32 + int8; no TensorFlow needed)."""
    from edgefleet.models.build.pipeline import BuildOptions, build_package

    out = tmp_path_factory.getbasetemp() / "cascade-pkgs" / "digits"
    if not out.exists():  # test modules import this fixture: build once per session
        build_package(BuildOptions(task="digits", out=out, formats="onnx", seed=0))
    return out


@pytest.fixture(scope="session")
def cloud_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits cloud ensemble (3 members keep the fixture quick)."""
    from edgefleet.models.build.cloud import CloudOptions, build_cloud_package

    out = tmp_path_factory.getbasetemp() / "cascade-pkgs" / "digits-cloud"
    if not out.exists():
        build_cloud_package(CloudOptions(task="digits", out=out, members=3))
    return out


def digit_rows(n: int) -> np.ndarray:
    """``n`` raw digits rows from the held-out test split."""
    from edgefleet.models.core.tasks import get_task

    return get_task("digits").split().x_test[:n]


def mqtt_cfg(broker: MosquittoBroker) -> MqttConfig:
    """Client settings for the test broker, with a fast first retry."""
    return MqttConfig(host=broker.host, port=broker.port, backoff_base=0.05, backoff_cap=0.5)


@contextmanager
def scorer_thread(pkg: Path, broker: MosquittoBroker, *, scorer_id: str = "s-inproc",
                  max_wait_ms: float = 5.0, metrics: Metrics | None = None,
                  ) -> Iterator[Scorer]:
    """An in-process scorer serving until the block ends (waits until it is subscribed)."""
    m = metrics or Metrics()
    scorer = Scorer(Predictor.load(pkg, threads=1, metrics=m), mqtt_cfg(broker),
                    ScorerConfig(scorer_id=scorer_id, max_wait_ms=max_wait_ms), m)
    with Spy(broker, scorer_status_topic(scorer_id)) as spy:
        stop = threading.Event()
        t = threading.Thread(target=scorer.run, args=(stop,), daemon=True)
        t.start()
        try:
            spy.wait_for(lambda msgs: any(b'"online"' in p for _, p, _ in msgs), 15)
            yield scorer
        finally:
            stop.set()
            t.join(10)


def spawn_scorer(pkg: Path, broker: MosquittoBroker, scorer_id: str,
                 *extra: str) -> subprocess.Popen[str]:
    """``edgefleet scorer run`` as a real process; returns once it announced itself online."""
    with Spy(broker, scorer_status_topic(scorer_id)) as spy:
        proc = subprocess.Popen(
            [str(BIN / "edgefleet"), "scorer", "run", "--package", str(pkg), "--broker",
             f"{broker.host}:{broker.port}", "--id", scorer_id, "--threads", "1", "--json",
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            spy.wait_for(lambda msgs: any(b'"online"' in p for _, p, _ in msgs), 60)
        except AssertionError:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"scorer {scorer_id} never came online: {err[-2000:]}") \
                from None
    return proc


class Spy:
    """A plain MQTT 5 client recording every message on ``topic`` (wildcards allowed)."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.messages: list[tuple[str, bytes, Any]] = []
        self._cond = threading.Condition()
        self._c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self._c.on_message = self._record
        self._subscribed = threading.Event()
        self._c.on_subscribe = lambda *_: self._subscribed.set()
        self._broker = broker
        self._topic = topic

    def _record(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), msg.properties))
            self._cond.notify_all()

    def __enter__(self) -> Spy:
        self._c.connect(self._broker.host, self._broker.port)
        self._c.subscribe(self._topic, qos=1)
        self._c.loop_start()
        assert self._subscribed.wait(10), "spy could not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self._c.loop_stop()
        self._c.disconnect()

    @property
    def client(self) -> mqtt.Client:
        """The underlying paho client (to publish hand-made messages)."""
        return self._c

    def wait_for(self, pred: Any, timeout: float) -> list[tuple[str, bytes, Any]]:
        """Block until ``pred(messages)`` is true; AssertionError on timeout."""
        end = time.monotonic() + timeout
        with self._cond:
            while not pred(self.messages):
                left = end - time.monotonic()
                assert left > 0, f"timed out; got {len(self.messages)} messages"
                self._cond.wait(left)
            return list(self.messages)


def publish_request(spy: Spy, topic: str, payload: bytes, *, reply_to: str | None,
                    corr: bytes | None) -> None:
    """Publish a hand-made request with the given MQTT 5 properties."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    if reply_to is not None:
        props.ResponseTopic = reply_to
    if corr is not None:
        props.CorrelationData = corr
    spy.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)


def reply_json(payload: bytes) -> dict[str, Any]:
    """A reply payload as a dict."""
    out: dict[str, Any] = json.loads(payload)
    return out
