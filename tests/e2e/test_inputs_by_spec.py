"""The agent serving imported models by their input spec, against the real parts: a
streaming sensor on a pseudo-terminal whose frames become windows, and the local API over
its Unix socket taking nested lists and raw uint8 images. Mismatches are error replies
and counters; the agent keeps serving."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.agent.daemon import Agent
from edgefleet.device.agent.local_api import request
from edgefleet.device.wire.frames import PayloadType, encode_frame
from edgefleet.server.fleet.broker import MosquittoBroker
from tests.device.serial_support import wait_until
from tests.support.imported import image_model, window_model, windows_data
from tests.support.local_agent import local_agent
from tests.support.telemetry import raw_client

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(180)]


def _agent(tmp_path: Path, package: Path, **sections: Any) -> Agent:
    return local_agent(tmp_path, package, "dev-spec", **sections)


def test_serial_samples_become_windows_over_a_pty(tmp_path: Path) -> None:
    pkg = window_model(tmp_path)  # 16 samples x 3 channels; class = the hot channel
    master, slave = os.openpty()
    agent = _agent(tmp_path, pkg, input={"serial": os.ttyname(slave), "hop": 8})
    try:
        assert agent.reader is not None
        wait_until(agent.reader.connected.is_set, what="the agent to open the pty")
        # Windows of a constant hot channel, streamed 2 samples (6 values) per frame:
        # with hop 8, every 8 samples after the first 16 complete one window.
        xs, ys = windows_data(4, 16, 3, seed=9)
        stream = xs.reshape(-1, 3)
        seq = 0
        for i in range(0, len(stream), 2):
            os.write(master, encode_frame(1, seq, seq, PayloadType.F32_VECTOR,
                                          stream[i:i + 2].astype("<f4").tobytes()))
            seq += 1
        n_windows = (len(stream) - 16) // 8 + 1
        wait_until(lambda: len(agent.last_answers) >= n_windows, what="windowed answers")
        got = [a["label"] for a in agent.last_answers]
        assert len(got) == n_windows
        # The windows at offsets 0, 16, 32, 48 are exactly the generated ones.
        assert got[0::2] == ys.tolist()
        m = agent.metrics
        # A frame of 5 values is not whole 3-channel samples: refused, counted, no answer.
        os.write(master, encode_frame(1, seq, seq, PayloadType.F32_VECTOR,
                                      np.zeros(5, "<f4").tobytes()))
        seq += 1
        wait_until(lambda: m.counter("input_rejected_channels") == 1, what="the refusal")
        # A lost frame breaks the series: the partial window is dropped, not glued.
        for step in (0, 5):  # seq, then seq + 5: four frames missing
            os.write(master, encode_frame(1, seq + step, 0, PayloadType.F32_VECTOR,
                                          stream[:2].astype("<f4").tobytes()))
        wait_until(lambda: m.counter("input_window_resets") >= 2, what="the reset")
        # NaN samples make a window the model never sees.
        seq += 6
        for _ in range(8):
            os.write(master, encode_frame(1, seq, 0, PayloadType.F32_VECTOR,
                                          np.full(6, np.nan, "<f4").tobytes()))
            seq += 1
        wait_until(lambda: m.counter("input_rejected_nonfinite") == 1, what="NaN window")
        assert len(agent.last_answers) == n_windows
        assert m.counter("inference_internal_errors") == 0
        # Still serving: after a restart of the sensor's numbering, a clean window is
        # answered (the series starts afresh: no NaN sample carried over).
        seq = 1000
        for i in range(0, 16, 2):
            os.write(master, encode_frame(1, seq, 0, PayloadType.F32_VECTOR,
                                          xs[1, i:i + 2].astype("<f4").tobytes()))
            seq += 1
        wait_until(lambda: len(agent.last_answers) == n_windows + 1, what="a new answer")
        assert agent.last_answers[-1]["label"] == int(ys[1])
    finally:
        agent.stop()
        os.close(master)
        os.close(slave)


def test_local_api_takes_nested_lists_and_raw_images(tmp_path: Path,
                                                     mosquitto: MosquittoBroker) -> None:
    pkg = image_model(tmp_path)  # 8x8x1 NHWC digits, pixels 0..16
    d = np.load(tmp_path / "eval.npz")
    x, y = d["x"][:20], d["y"][:20]
    reports: list[dict[str, Any]] = []
    sub = raw_client(mosquitto.port)
    sub.on_message = lambda _c, _u, msg: reports.append(json.loads(msg.payload))
    sub.subscribe("edgefleet/v1/dev-spec/metrics", qos=1)
    agent = _agent(tmp_path, pkg, mqtt={"host": mosquitto.host, "port": mosquitto.port},
                   telemetry={"enabled": True, "interval_s": 0.3})
    sock = agent.cfg.socket_path
    try:
        nested = request(sock, {"id": 1, "input": x.tolist()})["predictions"]
        flat = request(sock, {"id": 2, "input": x.reshape(20, 64).tolist()})["predictions"]
        labels = [p["label"] for p in nested]
        assert labels == [p["label"] for p in flat]
        assert np.mean(np.array(labels) == y) >= 0.85
        one = request(sock, {"id": 3, "input": x[4].tolist()})["predictions"]
        assert [p["label"] for p in one] == [labels[4]]
        img = base64.b64encode(x[4].astype(np.uint8).tobytes()).decode()
        by_image = request(sock, {"id": 4, "image": img})["predictions"]
        assert [p["label"] for p in by_image] == [labels[4]]
        assert by_image[0]["confidence"] == pytest.approx(one[0]["confidence"], abs=1e-6)
        m = agent.metrics
        for req, code, reason in [
            ({"id": 5, "input": np.zeros((8, 8, 3)).tolist()}, "invalid_input:channels",
             "channels"),
            ({"id": 6, "input": np.zeros(63).tolist()}, "invalid_input:count", "count"),
            ({"id": 7, "image": base64.b64encode(bytes(63)).decode()}, "invalid_input:count",
             "count"),
            ({"id": 8, "input": [1e300] * 64}, "invalid_input:nonfinite", "nonfinite"),
        ]:
            before = m.counter(f"input_rejected_{reason}")
            err = request(sock, req)["error"]
            assert err["code"] == code, err
            assert "expected float32 [8, 8, 1]" in err["message"]
            assert m.counter(f"input_rejected_{reason}") == before + 1
        bad = request(sock, {"id": 9, "image": "not base64!"})["error"]
        assert bad["code"] == "bad_request" and "base64" in bad["message"]
        assert "predictions" in request(sock, {"id": 10, "input": x[0].tolist()})
        # The refusals go out with the telemetry.
        wait_until(lambda: any(r["body"]["counters"].get("input_rejected_count") == 2
                               for r in list(reports)), what="a report with the refusals")
        last = [r["body"] for r in list(reports)
                if r["body"]["counters"].get("input_rejected_count") == 2][-1]
        assert last["counters"]["input_rejected_channels"] == 1
        assert last["counters"]["input_rejected_nonfinite"] == 1
    finally:
        agent.stop()
        sub.loop_stop()
        sub.disconnect()
