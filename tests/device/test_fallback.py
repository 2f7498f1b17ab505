"""The device side of the cascade against a real mosquitto: policy, payloads, deadlines."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import MqttConfig
from edgefleet.device.inference.cascade import FallbackConfig, HybridPredictor
from edgefleet.device.inference.score_client import ScoreClient
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.wire.scoring import REQUEST_PREFIX, request_topic
from edgefleet.server.fleet.broker import MosquittoBroker, free_port
from tests.support import cascade as support
from tests.support.cascade import Spy, digit_rows, mqtt_cfg, scorer_thread

device_pkg = support.device_pkg  # session fixtures shared with the other cascade tests
cloud_pkg = support.cloud_pkg

pytestmark = pytest.mark.timeout(120)


def _hybrid(pkg: Path, cfg: FallbackConfig, client: ScoreClient | None,
            metrics: Metrics) -> HybridPredictor:
    return HybridPredictor(Predictor.load(pkg, threads=1, metrics=metrics), cfg, client,
                           metrics)


def _client(broker: MosquittoBroker, metrics: Metrics, device: str = "dev1") -> ScoreClient:
    client = ScoreClient(mqtt_cfg(broker), device, metrics=metrics).start()
    assert client.wait_connected(10)
    return client


def test_confident_answers_stay_local_and_publish_nothing(
        device_pkg: Path, mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    with Spy(mosquitto, "edgefleet/#") as spy, _client(mosquitto, m) as client:
        hp = _hybrid(device_pkg, FallbackConfig(threshold=0.0), client, m)
        answers = [hp.predict(row) for row in digit_rows(20)]
        assert all(a.source == "local" and not a.escalated for a in answers)
    assert spy.messages == []
    assert m.counter("fallback_local") == 20 and m.counter("fallback_escalations") == 0


def test_policy_off_never_publishes(device_pkg: Path, mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    with Spy(mosquitto, "#") as spy, _client(mosquitto, m) as client:
        hp = _hybrid(device_pkg, FallbackConfig(mode="off", threshold=1.0), client, m)
        answers = [hp.predict(row, raw=row) for row in digit_rows(15)]
    assert all(a.source == "local" and a.reason == "policy_off" for a in answers)
    assert [t for t, _, _ in spy.messages if t.startswith("edgefleet/")] == []
    assert m.counter("fallback_off") == 15 and m.counter("fallback_escalations") == 0


@pytest.mark.parametrize("mode", ["features", "raw"])
def test_payload_holds_what_the_policy_allows(device_pkg: Path, mosquitto: MosquittoBroker,
                                              mode: str) -> None:
    m = Metrics()
    raw = np.linspace(-1.0, 1.0, 96, dtype=np.float32)  # a stand-in for a sensor window
    row = digit_rows(1)[0]
    with Spy(mosquitto, REQUEST_PREFIX + "#") as spy, _client(mosquitto, m, "dev-p") as c:
        hp = _hybrid(device_pkg, FallbackConfig(mode=mode, threshold=1.0, deadline_ms=50),
                     c, m)
        ans = hp.predict(row, raw=raw)
        msgs = spy.wait_for(lambda ms: len(ms) >= 1, 5)
    assert ans.source == "degraded" and ans.reason == "timeout"  # no scorer is running
    topic, payload, props = msgs[0]
    body = json.loads(payload)
    assert topic == request_topic("dev-p")
    assert props.ResponseTopic == "edgefleet/v1/score/response/dev-p"
    assert len(props.CorrelationData) == 16
    assert body["mode"] == mode and body["task"] == "digits"
    np.testing.assert_array_equal(np.asarray(body["features"], np.float32), row)
    if mode == "raw":
        np.testing.assert_array_equal(np.asarray(body["raw"], np.float32), raw)
    else:
        assert "raw" not in body


def test_cloud_answers_within_deadline(device_pkg: Path, cloud_pkg: Path,
                                       mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    cloud = Predictor.load(cloud_pkg, threads=1, metrics=Metrics())
    rows = digit_rows(10)
    with scorer_thread(cloud_pkg, mosquitto), _client(mosquitto, m) as client:
        hp = _hybrid(device_pkg, FallbackConfig(threshold=1.0, deadline_ms=2000), client, m)
        answers = [hp.predict(r) for r in rows]
    assert [a.source for a in answers] == ["cloud"] * 10
    assert [a.prediction.label for a in answers] == [p.label for p in cloud.predict_batch(rows)]
    assert answers[0].model == f"{cloud.manifest.name}@{cloud.manifest.version}"
    assert m.counter("fallback_cloud") == 10 and m.counter("fallback_escalations") == 10


def test_absent_scorer_degrades_at_the_deadline(device_pkg: Path,
                                                mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    with _client(mosquitto, m) as client:
        hp = _hybrid(device_pkg, FallbackConfig(threshold=1.0, deadline_ms=80), client, m)
        answers = [hp.predict(r) for r in digit_rows(5)]
    assert all(a.source == "degraded" and a.reason == "timeout" for a in answers)
    assert all(a.prediction == a.local for a in answers)
    assert all(a.latency_ms >= 80 for a in answers)
    assert m.counter("fallback_degraded_timeout") == 5


def test_broker_down_degrades_without_waiting(device_pkg: Path) -> None:
    m = Metrics()
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), backoff_base=0.05, backoff_cap=0.2)
    with ScoreClient(cfg, "dev-nobroker", metrics=m) as client:
        assert not client.wait_connected(0.3)
        hp = _hybrid(device_pkg, FallbackConfig(threshold=1.0, deadline_ms=5000), client, m)
        ans = hp.predict(digit_rows(1)[0])
    assert ans.source == "degraded" and ans.reason == "not_connected"
    assert ans.latency_ms < 5000
    assert m.counter("fallback_mqtt_connect_errors") >= 1


def _fake_scorer(spy: Spy, reply: Any) -> None:
    """Answer every request seen by ``spy`` with ``reply(request_props)`` → (payload, corr)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        payload, corr = reply(msg.properties)
        props = Properties(PacketTypes.PUBLISH)
        if corr is not None:
            props.CorrelationData = corr
        threading.Thread(target=lambda: spy.client.publish(
            msg.properties.ResponseTopic, payload, properties=props)).start()

    spy.client.on_message = on_message


@pytest.mark.parametrize(("name", "payload", "with_corr", "reason", "counter"), [
    ("garbage", b"\xff\x00not json", True, "bad_reply", None),
    ("label out of range", b'{"v":1,"ok":true,"label":99,"confidence":0.9}', True,
     "bad_reply", None),
    ("unknown version", b'{"v":7,"ok":true,"label":1,"confidence":0.9}', True, "bad_reply",
     None),
    ("error reply", b'{"v":1,"ok":false,"error":"overloaded","message":"busy"}', True,
     "scorer_error", "fallback_scorer_error_overloaded"),
    ("no correlation", b'{"v":1,"ok":true,"label":1,"confidence":0.9}', False, "timeout",
     "fallback_reply_uncorrelated"),
])
def test_malformed_replies_degrade_and_count(device_pkg: Path, mosquitto: MosquittoBroker,
                                             name: str, payload: bytes, with_corr: bool,
                                             reason: str, counter: str | None) -> None:
    m = Metrics()
    with Spy(mosquitto, REQUEST_PREFIX + "+") as fake, _client(mosquitto, m) as client:
        _fake_scorer(fake, lambda props: (payload,
                                          props.CorrelationData if with_corr else None))
        hp = _hybrid(device_pkg, FallbackConfig(threshold=1.0, deadline_ms=300), client, m)
        ans = hp.predict(digit_rows(1)[0])
        assert client.connected  # the bad reply did not break the connection
    assert ans.source == "degraded" and ans.reason == reason, name
    assert m.counter(f"fallback_degraded_{reason}") == 1
    if counter:
        assert m.counter(counter) == 1
    assert m.counter("fallback_mqtt_callback_errors") == 0


def test_threshold_comes_from_manifest_unless_overridden(device_pkg: Path) -> None:
    m = Metrics()
    pred = Predictor.load(device_pkg, threads=1, metrics=m)
    assert HybridPredictor(pred, FallbackConfig(), None, m).tau == \
        pred.manifest.fallback_threshold
    assert HybridPredictor(pred, FallbackConfig(threshold=0.7), None, m).tau == 0.7
    ans = HybridPredictor(pred, FallbackConfig(threshold=1.0), None, m).predict(digit_rows(1))
    assert ans.source == "degraded" and ans.reason == "no_client"


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A spy on ``Predictor.validate``: one entry per call, on any predictor."""
    calls: list[int] = []
    real = Predictor.validate

    def spy(self: Predictor, x: Any) -> np.ndarray:
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(Predictor, "validate", spy)
    return calls


#: onnx runs on the module's ONNX-only package; tflite needs the TensorFlow-built one.
BACKEND_PKGS = [pytest.param(("onnx", "device_pkg"), id="onnx"),
                pytest.param(("tflite", "digits_package"), id="tflite",
                             marks=pytest.mark.slow)]


@pytest.fixture(params=BACKEND_PKGS)
def backend_pkg(request: pytest.FixtureRequest) -> tuple[str, Path]:
    backend, fixture = request.param
    return backend, request.getfixturevalue(fixture)


def _served(pkg: Path, backend: str, m: Metrics) -> Any:
    """The agent's view of a ServingModel: an active model, a previous one under watch,
    and a shadow of the same package (all three may answer the same input)."""
    from edgefleet.device.agent.daemon import _ServingView
    from edgefleet.device.inference.serving import ServingModel

    serving = ServingModel(m)
    serving.swap(Predictor.load(pkg, backend=backend, threads=1, metrics=m), watch=False)
    serving.swap(Predictor.load(pkg, backend=backend, threads=1, metrics=m))
    serving.set_shadow(Predictor.load(pkg, backend=backend, threads=1, metrics=m))
    return _ServingView(serving)


def test_cascade_validates_each_input_once(backend_pkg: tuple[str, Path],
                                           validations: list[int]) -> None:
    backend, pkg = backend_pkg
    m = Metrics()
    pred = Predictor.load(pkg, backend=backend, threads=1, metrics=m)
    row = digit_rows(1)[0]
    cases = [(FallbackConfig(threshold=0.0), "local", None),
             (FallbackConfig(threshold=1.0), "degraded", "no_client"),
             (FallbackConfig(threshold=1.0, mode="off"), "local", "policy_off")]
    for target in (pred, _served(pkg, backend, m)):
        for cfg, source, reason in cases:
            validations.clear()
            ans = HybridPredictor(target, cfg, None, m).predict(row)
            assert (ans.source, ans.reason) == (source, reason)
            assert len(validations) == 1, (target, cfg)
            assert ans.local.label == pred.predict(row).label
    # The served answers ran the shadow too, on the same single check.
    assert m.counter("shadow_inferences") == len(cases)
    assert m.counter("shadow_errors") == 0


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(np.full(64, np.nan, np.float32), "nonfinite"),
     (np.full(64, 17.0, np.float32), "range"),
     (np.zeros(63, np.float32), "shape"),
     (np.array(["x"] * 64), "dtype")],
)
def test_cascade_rejects_bad_input_typed_and_counted(backend_pkg: tuple[str, Path],
                                                     bad: Any, reason: str,
                                                     validations: list[int]) -> None:
    backend, pkg = backend_pkg
    m = Metrics()
    pred = Predictor.load(pkg, backend=backend, threads=1, metrics=m)
    for n, target in enumerate((pred, _served(pkg, backend, m)), start=1):
        validations.clear()
        hp = HybridPredictor(target, FallbackConfig(threshold=1.0), None, m)
        with pytest.raises(InputError) as exc:
            hp.predict(bad)
        assert exc.value.reason == reason
        assert len(validations) == 1
        assert m.counter(f"inputs_invalid_{reason}") == n
    counters = m.snapshot()["counters"]
    assert counters.get("inferences", 0) == 0
    assert counters.get("shadow_inferences", 0) == 0
    assert not [k for k in counters if k.startswith("fallback_")]


def test_a_request_over_the_protocol_limit_is_never_published(
        mosquitto: MosquittoBroker) -> None:
    """The broker would drop the whole connection for it: refuse it here, counted."""
    from edgefleet.device.wire.scoring import MAX_REQUEST_BYTES

    m = Metrics()
    with Spy(mosquitto, "edgefleet/#") as spy, _client(mosquitto, m) as client:
        assert client.request(b"x" * (MAX_REQUEST_BYTES + 1), timeout_s=0.5) is None
        assert client.link.connected
    assert spy.messages == []
    assert m.counter("fallback_request_too_large") == 1
