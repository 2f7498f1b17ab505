"""The cloud scorer against a real mosquitto: answers, micro-batches, and bad requests."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.device.wire.scoring import (
    MAX_REQUEST_BYTES,
    ScoreRequest,
    encode,
    request_topic,
    response_topic,
)
from edgefleet.server.cli.home_opts import parse_broker
from edgefleet.server.fleet.broker import MosquittoBroker
from tests.conftest import run_cli
from tests.support import cascade as support
from tests.support.cascade import Spy, digit_rows, publish_request, reply_json, scorer_thread

cloud_pkg = support.cloud_pkg

pytestmark = pytest.mark.timeout(120)

REPLY_TO = response_topic("tester")


def _request(row: np.ndarray, **over: object) -> bytes:
    req = ScoreRequest(task="digits", model="digits-mlp@1.0.0", mode="features",
                       features=[float(v) for v in row], deadline_ms=5000)
    return encode(req.model_copy(update=over)) if over else encode(req)


def test_answers_carry_label_model_and_correlation(cloud_pkg: Path,
                                                   mosquitto: MosquittoBroker) -> None:
    rows = digit_rows(6)
    want = [p.label for p in Predictor.load(cloud_pkg, threads=1).predict_batch(rows)]
    with scorer_thread(cloud_pkg, mosquitto, scorer_id="s-a"), \
            Spy(mosquitto, REPLY_TO) as spy:
        for i, row in enumerate(rows):
            publish_request(spy, request_topic("tester"), _request(row), reply_to=REPLY_TO,
                            corr=b"id-%d" % i)
        msgs = spy.wait_for(lambda ms: len(ms) >= 6, 15)
    by_corr = {props.CorrelationData: reply_json(p) for _, p, props in msgs}
    assert sorted(by_corr) == sorted(b"id-%d" % i for i in range(6))
    for i in range(6):
        r = by_corr[b"id-%d" % i]
        assert r["ok"] and r["label"] == want[i] and r["scorer"] == "s-a"
        assert r["model"].startswith("digits-cloud@")
        assert abs(sum(r["probabilities"]) - 1.0) < 1e-4


def test_concurrent_requests_are_micro_batched(cloud_pkg: Path,
                                               mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    rows = digit_rows(24)
    with scorer_thread(cloud_pkg, mosquitto, scorer_id="s-b", max_wait_ms=50, metrics=m), \
            Spy(mosquitto, REPLY_TO) as spy:
        for i, row in enumerate(rows):  # a burst: the 50 ms batch window collects several
            publish_request(spy, request_topic("tester"), _request(row), reply_to=REPLY_TO,
                            corr=b"%d" % i)
        msgs = spy.wait_for(lambda ms: len(ms) >= 24, 15)
    batches = [reply_json(p)["batch"] for _, p, _ in msgs]
    assert max(batches) > 1
    assert m.counter("scorer_replies_ok") == 24


BAD = [
    ("not json", b"{nope", "bad_json"),
    ("wrong version", b'{"v":2}', "bad_request"),
    ("missing features", json.dumps({"v": 1, "task": "digits", "model": "m", "mode":
                                      "features", "deadline_ms": 100}).encode(), "bad_request"),
    ("NaN feature", b'{"v":1,"task":"digits","model":"m","mode":"features",'
                    b'"features":[NaN],"deadline_ms":100}', "bad_request"),
    ("raw in features mode", json.dumps({"v": 1, "task": "digits", "model": "m", "mode":
                                         "features", "features": [1.0], "raw": [1.0],
                                         "deadline_ms": 100}).encode(), "bad_request"),
    ("wrong task", json.dumps({"v": 1, "task": "vibration", "model": "m", "mode": "features",
                               "features": [1.0], "deadline_ms": 100}).encode(), "wrong_task"),
    ("wrong shape", json.dumps({"v": 1, "task": "digits", "model": "m", "mode": "features",
                                "features": [1.0] * 63, "deadline_ms": 100}).encode(),
     "bad_input"),
    ("out of range", json.dumps({"v": 1, "task": "digits", "model": "m", "mode": "features",
                                 "features": [99.0] * 64, "deadline_ms": 100}).encode(),
     "bad_input"),
    ("too large", b"[" + b"1," * (MAX_REQUEST_BYTES // 2) + b"1]", "too_large"),
]


def test_bad_requests_get_error_replies_and_counters(cloud_pkg: Path,
                                                     mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    with scorer_thread(cloud_pkg, mosquitto, scorer_id="s-c", metrics=m) as scorer, \
            Spy(mosquitto, REPLY_TO) as spy:
        for i, (_, payload, _) in enumerate(BAD):
            publish_request(spy, request_topic("tester"), payload, reply_to=REPLY_TO,
                            corr=b"bad-%d" % i)
        msgs = spy.wait_for(lambda ms: len(ms) >= len(BAD), 15)
        # no response topic, and a response topic outside the prefix: nothing to answer
        publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                        reply_to=None, corr=b"x")
        publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                        reply_to="devices/victim/cmd", corr=b"y")
        # and the scorer still answers a good request afterwards
        publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                        reply_to=REPLY_TO, corr=b"good")
        spy.wait_for(lambda ms: any(p.CorrelationData == b"good" for _, _, p in ms), 15)
        assert scorer.link.connected
    got = {props.CorrelationData: reply_json(p) for _, p, props in msgs}
    for i, (name, _, code) in enumerate(BAD):
        reply = got[b"bad-%d" % i]
        assert reply["ok"] is False and reply["error"] == code, name
        assert reply["message"]
    assert m.counter("scorer_bad_response_topic") == 2
    assert m.counter("scorer_errors_bad_request") == 4
    assert m.counter("scorer_errors_bad_input") == 2
    assert m.counter("scorer_errors_too_large") == 1
    assert m.counter("scorer_mqtt_callback_errors") == 0


def test_overloaded_queue_answers_overloaded(cloud_pkg: Path,
                                             mosquitto: MosquittoBroker) -> None:
    from edgefleet.server.scorer import Scorer, ScorerConfig

    m = Metrics()
    scorer = Scorer(Predictor.load(cloud_pkg, threads=1, metrics=m), support.mqtt_cfg(mosquitto),
                    ScorerConfig(scorer_id="s-d", queue_size=2), m)
    stop = threading.Event()
    net = threading.Thread(target=scorer._network, args=(stop,), daemon=True)
    net.start()  # network only: nothing drains the queue
    try:
        with Spy(mosquitto, REPLY_TO) as spy:
            spy.wait_for(lambda _: scorer.link.connected, 10)
            time.sleep(0.2)  # let the SUBSCRIBE reach the broker
            for i in range(5):
                publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                                reply_to=REPLY_TO, corr=b"%d" % i)
            msgs = spy.wait_for(lambda ms: len(ms) >= 3, 15)
    finally:
        stop.set()
        net.join(5)
        scorer.link.close()
    assert {reply_json(p)["error"] for _, p, _ in msgs} == {"overloaded"}
    assert m.counter("scorer_overloaded") == 3


@pytest.mark.parametrize(("text", "want"), [
    ("h:1883", ("h", 1883)), ("h", ("h", 1883)), ("::1:8883", ("::1", 8883)),
    ("broker.example.org:8883", ("broker.example.org", 8883)),
    ("10.0.0.5", ("10.0.0.5", 1883)),
    ("[::1]:1883", ("::1", 1883)), ("[::1]", ("::1", 1883)),
    ("[2001:db8::7]:8883", ("2001:db8::7", 8883)),
    (":1884", ("127.0.0.1", 1884)),  # `retrain watch` took this for loopback
    (" h:1883 ", ("h", 1883)),
])
def test_parse_broker(text: str, want: tuple[str, int]) -> None:
    assert parse_broker(text) == want


@pytest.mark.parametrize("text", ["", "h:", "h:0", "h:65536", "h:port", "1884", "[::1",
                                  "[::1]1883", "[::1]:", "[nohost]:1883", "h: 1883",
                                  "user@h:1883", "h:１８８３"])
def test_parse_broker_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="--superlink must be HOST:PORT"):
        parse_broker(text, "--superlink")


def test_cli_refuses_bad_broker_and_tampered_package(cloud_pkg: Path, tmp_path: Path) -> None:
    proc = run_cli("scorer", "run", "--package", str(cloud_pkg), "--broker", "h:port")
    assert proc.returncode == 64 and "HOST:PORT" in proc.stderr
    bad = tmp_path / "cloud"
    shutil.copytree(cloud_pkg, bad)
    with (bad / "model_fp32.onnx").open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    proc = run_cli("scorer", "run", "--package", str(bad), "--broker", "127.0.0.1:1")
    assert proc.returncode != 0 and "model_fp32.onnx" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- issue 15: one hostile request never hurts the others --------------------------------
DEEP = b'{"v":1,"task":"digits","model":"m","mode":"features","deadline_ms":5000,' \
       b'"features":' + b"[" * 20_000 + b"]" * 20_000 + b"}"


def test_one_bad_request_in_a_micro_batch_leaves_the_others_answered(
        cloud_pkg: Path, mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    rows = digit_rows(10)
    bad = [DEEP, b'{"v":1,"task":"digits","model":"m","mode":"features","deadline_ms":5000,'
                 b'"features":[Infinity]}']
    with scorer_thread(cloud_pkg, mosquitto, scorer_id="s-h", max_wait_ms=200,
                       metrics=m) as scorer, Spy(mosquitto, REPLY_TO) as spy:
        for i, row in enumerate(rows):  # one burst: the bad ones sit among the good ones
            publish_request(spy, request_topic("tester"), _request(row), reply_to=REPLY_TO,
                            corr=b"g%d" % i)
            if i in (3, 6):
                publish_request(spy, request_topic("tester"), bad[i == 6],
                                reply_to=REPLY_TO, corr=b"bad%d" % i)
        msgs = spy.wait_for(lambda ms: len(ms) >= 12, 20)
        assert scorer.link.connected
        quarantine = list(scorer.quarantine)
    got = {props.CorrelationData: reply_json(p) for _, p, props in msgs}
    for i in range(10):
        assert got[b"g%d" % i]["ok"], got[b"g%d" % i]
    assert max(got[b"g%d" % i]["batch"] for i in range(10)) > 1  # they were batched
    for c in (b"bad3", b"bad6"):
        assert got[c]["ok"] is False and got[c]["error"] == "bad_request"
    assert m.counter("scorer_replies_ok") == 10
    assert m.counter("scorer_rejected_too_deep") == 1
    assert m.counter("scorer_rejected_non_finite") == 1
    assert m.counter("scorer_worker_errors") == 0
    assert [(q["device"], q["topic"], q["reason"]) for q in quarantine] == [
        ("tester", request_topic("tester"), "too_deep"),
        ("tester", request_topic("tester"), "non_finite")]
    assert quarantine[0]["prefix"].startswith('{"v":1') and quarantine[0]["size"] == len(DEEP)


def test_reply_topic_of_another_device_is_refused(cloud_pkg: Path,
                                                  mosquitto: MosquittoBroker) -> None:
    m = Metrics()
    victim = response_topic("victim")
    with scorer_thread(cloud_pkg, mosquitto, scorer_id="s-v", metrics=m) as scorer, \
            Spy(mosquitto, "edgefleet/v1/score/response/+") as spy:
        for i in range(3):
            publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                            reply_to=victim, corr=b"aimed-%d" % i)
        publish_request(spy, request_topic("tester"), _request(digit_rows(1)[0]),
                        reply_to=REPLY_TO, corr=b"own")
        msgs = spy.wait_for(lambda ms: any(p.CorrelationData == b"own" for _, _, p in ms), 15)
        time.sleep(0.3)  # anything aimed at the victim would have arrived by now
        msgs = list(spy.messages)
        quarantine = list(scorer.quarantine)
    assert [t for t, _, _ in msgs] == [REPLY_TO]
    assert m.counter("scorer_foreign_response_topic") == 3
    assert [(q["device"], q["reason"]) for q in quarantine] == [
        ("tester", "foreign_response_topic")] * 3
    assert victim in quarantine[0]["detail"]


@pytest.mark.slow
def test_scorer_process_isolates_bad_requests_and_refuses_foreign_reply_topics(
        cloud_pkg: Path, mosquitto: MosquittoBroker) -> None:
    """The same against ``edgefleet scorer run`` as a real process (counters from its
    ``--json`` output at SIGTERM)."""
    import signal

    from tests.support.cascade import spawn_scorer

    proc = spawn_scorer(cloud_pkg, mosquitto, "s-proc", "--max-wait-ms", "200")
    try:
        with Spy(mosquitto, "edgefleet/v1/score/response/+") as spy:
            rows = digit_rows(8)
            for i, row in enumerate(rows):
                publish_request(spy, request_topic("tester"), _request(row), reply_to=REPLY_TO,
                                corr=b"g%d" % i)
                if i == 4:
                    publish_request(spy, request_topic("tester"), DEEP, reply_to=REPLY_TO,
                                    corr=b"deep")
                    publish_request(spy, request_topic("tester"), _request(row),
                                    reply_to=response_topic("victim"), corr=b"aimed")
            msgs = spy.wait_for(lambda ms: len(ms) >= 9, 30)
            time.sleep(0.3)
            msgs = list(spy.messages)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    got = {props.CorrelationData: (topic, reply_json(p)) for topic, p, props in msgs}
    assert sorted(got) == sorted([b"deep", *(b"g%d" % i for i in range(8))])
    assert all(topic == REPLY_TO for topic, _ in got.values())  # nothing reached "victim"
    assert all(got[b"g%d" % i][1]["ok"] for i in range(8))
    assert got[b"deep"][1]["error"] == "bad_request"
    counters = json.loads(out)["counters"]
    assert counters["scorer_replies_ok"] == 8
    assert counters["scorer_rejected_too_deep"] == 1
    assert counters["scorer_foreign_response_topic"] == 1
    assert counters.get("scorer_worker_errors", 0) == 0
