"""Every way a label reaches the sample store, against the real part: the local API
over its Unix socket, LABEL frames from the sensor simulator over a pty, and the cloud
scorer's answers over mosquitto. Bad labels are refused, counted and stored nowhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.agent.daemon import Agent
from edgefleet.device.agent.local_api import request
from edgefleet.server.fleet.broker import MosquittoBroker
from tests.conftest import BIN
from tests.device.serial_support import PtyPair, wait_until
from tests.support import cascade as support
from tests.support.cascade import digit_rows, scorer_thread
from tests.support.local_agent import local_agent

device_pkg = support.device_pkg
cloud_pkg = support.cloud_pkg

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.timeout(240)]


def _agent(tmp_path: Path, package: Path, **sections: Any) -> Agent:
    return local_agent(tmp_path, package, "dev-lab", **sections)


def test_local_api_labels_by_answer_id_by_input_and_in_batches(
        tmp_path: Path, device_pkg: Path) -> None:
    agent = _agent(tmp_path, device_pkg)
    sock = agent.cfg.socket_path
    try:
        rows = digit_rows(12)
        preds = request(sock, {"id": 1, "input": rows.tolist()})["predictions"]
        assert len({p["id"] for p in preds}) == 12
        # Delayed ground truth for ten answers, in one batch, by answer id.
        truth = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        reply = request(sock, {"id": 2, "label": [{"answer": p["id"], "class": c}
                                                  for p, c in zip(preds, truth, strict=False)]})
        assert reply["labels"]["stored"] == 10 and reply["labels"]["refused"] == []
        # The input itself, class by name.
        name = agent.view.manifest.labels[3]
        reply = request(sock, {"id": 3, "label": {"input": rows[11].tolist(), "class": name}})
        assert reply["labels"]["stored"] == 1
        bad = request(sock, {"id": 4, "label": [
            {"answer": preds[10]["id"], "class": 10},          # unknown class
            {"answer": "feedface-99", "class": 1},             # unknown answer id
            {"input": rows[0][:10].tolist(), "class": 1},      # wrong input shape
            {"input": rows[0].tolist(), "class": -1},          # unknown class
        ]})["labels"]
        assert bad["stored"] == 0
        assert [r["reason"] for r in bad["refused"]] == [
            "unknown_class", "unknown_answer", "bad_input", "unknown_class"]
        # NaN (a JSON NaN literal): the guarded reader refuses the whole request first.
        nan = request(sock, {"id": 5, "label": [{"input": [float("nan")] * 64, "class": 1}]})
        assert nan["error"]["code"] == "bad_json" and "non_finite" in nan["error"]["message"]
        m = agent.metrics
        assert m.counter("data_labels_refused_unknown_class") == 2
        assert m.counter("data_labels_refused_unknown_answer") == 1
        assert m.counter("data_labels_refused_bad_input") == 1
        assert m.counter("api_errors_bad_json") == 1
        assert agent.store is not None
        got = agent.store.samples()
        assert got.y.tolist() == [*truth, 3] and set(got.sources) == {"api"}
        np.testing.assert_array_equal(got.x, rows[[*range(10), 11]].astype(np.float32))
        assert agent._extra_report()["samples"]["by_source"] == {"api": 11}
    finally:
        agent.stop()


def test_serial_label_frames_from_the_simulator_over_a_pty(
        tmp_path: Path, device_pkg: Path) -> None:
    pair = PtyPair(tmp_path).plug()
    agent = _agent(tmp_path, device_pkg, input={"serial": str(pair.b)})
    truth_file = tmp_path / "truth.jsonl"
    try:
        wait_until(lambda: agent.reader is not None and agent.reader.connected.is_set(), 10,
                   "the reader")
        res = subprocess.run(
            [str(BIN / "edgefleet-sensor-sim"), "--task", "digits", "--port", str(pair.a),
             "--rate", "200", "--count", "40", "--seed", "3", "--label-every", "8",
             "--truth", str(truth_file), "--json"],
            capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["labelled"] == 40
        assert agent.store is not None
        wait_until(lambda: agent.store.count() == 40, 20, "40 labelled samples")  # type: ignore[union-attr]
        truth = [json.loads(line)["label"] for line in truth_file.read_text().splitlines()]
        got = agent.store.samples()
        assert got.y.tolist() == truth and set(got.sources) == {"serial"}
        assert agent.metrics.counter("serial_frames_ok") == 45  # 40 samples + 5 label frames
    finally:
        agent.stop()
        pair.unplug()


def test_scorer_answers_become_labels_above_the_floor(
        tmp_path: Path, device_pkg: Path, cloud_pkg: Path, mosquitto: MosquittoBroker) -> None:
    floor = 0.9
    with scorer_thread(cloud_pkg, mosquitto):
        agent = _agent(tmp_path, device_pkg,
                       mqtt={"host": mosquitto.host, "port": mosquitto.port,
                             "backoff_base": 0.05, "backoff_cap": 0.5},
                       fallback={"mode": "features", "threshold": 1.0, "deadline_ms": 2000},
                       data={"label_sources": ["api", "scorer"], "cloud_labels": True,
                             "cloud_min_confidence": floor})
        try:
            assert agent.hybrid is not None and agent.hybrid.client is not None
            assert agent.hybrid.client.wait_connected(10)
            rows = digit_rows(30)
            preds = request(agent.cfg.socket_path, {"id": 1, "input": rows.tolist()},
                            timeout=60)["predictions"]
            cloud = [(i, p) for i, p in enumerate(preds) if p["source"] == "cloud"]
            assert len(cloud) >= 25
            kept = [(i, p) for i, p in cloud if p["confidence"] >= floor]
            assert agent.store is not None
            got = agent.store.samples()
            assert set(got.sources) == {"scorer"}
            assert got.y.tolist() == [p["label"] for _, p in kept]
            np.testing.assert_array_equal(got.x, rows[[i for i, _ in kept]].astype(np.float32))
            assert agent.metrics.counter("data_labels_refused_low_confidence") == \
                len(cloud) - len(kept)
        finally:
            agent.stop()


def test_scorer_labels_are_off_unless_opted_in(tmp_path: Path, device_pkg: Path,
                                                cloud_pkg: Path,
                                                mosquitto: MosquittoBroker) -> None:
    with scorer_thread(cloud_pkg, mosquitto):
        agent = _agent(tmp_path, device_pkg,
                       mqtt={"host": mosquitto.host, "port": mosquitto.port},
                       fallback={"mode": "features", "threshold": 1.0, "deadline_ms": 2000})
        try:
            assert agent.hybrid is not None and agent.hybrid.client is not None
            assert agent.hybrid.client.wait_connected(10)
            preds = request(agent.cfg.socket_path, {"id": 1, "input": digit_rows(5).tolist()},
                            timeout=30)["predictions"]
            assert any(p["source"] == "cloud" for p in preds)
            assert agent.store is not None and agent.store.count() == 0
        finally:
            agent.stop()
