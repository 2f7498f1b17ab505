"""`edgefleet-sensor-sim` through a real socat pty pair into the serial reader."""

from __future__ import annotations

import itertools
import json
import queue
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.input.features import WINDOW, window_features
from edgefleet.device.input.serial_reader import SerialReader
from edgefleet.device.wire.frames import Frame, PayloadType
from edgefleet.models.sim.sensor_sim import samples
from tests.conftest import BIN, run_cli
from tests.device.serial_support import PtyPair, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _run_sim(pair: PtyPair, tmp_path: Path, *args: str) -> tuple[list[Frame], list[dict], Metrics]:
    metrics = Metrics()
    q: queue.Queue[Frame] = queue.Queue()
    reader = SerialReader(str(pair.b), q.put, metrics=metrics).start()
    truth = tmp_path / "truth.jsonl"
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        proc = run_cli("--port", str(pair.a), "--truth", str(truth), "--json", *args,
                       program="edgefleet-sensor-sim")
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in truth.read_text().splitlines()]
        good = sum(not r["damaged"] for r in rows)
        wait_until(lambda: q.qsize() >= good, what="undamaged frames")
        time.sleep(0.2)
    finally:
        reader.stop()
    return [q.get() for _ in range(q.qsize())], rows, metrics


@pytest.mark.parametrize("task", ["digits", "vibration"])
def test_sim_frames_arrive_through_faults(tmp_path: Path, task: str) -> None:
    pair = PtyPair(tmp_path).plug()
    try:
        frames, rows, metrics = _run_sim(
            pair, tmp_path, "--task", task, "--count", "60", "--rate", "0", "--seed", "4",
            "--faults", "bitflip=0.1,truncate=0.05,garbage=0.1,pause=0.05,pause_s=0.02")
    finally:
        pair.unplug()
    assert len(rows) == 60
    damaged = {r["seq"] for r in rows if r["damaged"]}
    assert 0 < len(damaged) < 30
    got = {f.seq: f for f in frames}
    assert set(range(60)) - damaged <= set(got)
    assert metrics.counter("serial_resyncs") >= len(damaged)
    labels = {r["seq"]: r["label"] for r in rows}
    for seq, f in got.items():
        if task == "digits":
            assert f.payload_type == PayloadType.U8_VECTOR and len(f.payload) == 64
            assert f.values().max() <= 16
        else:
            assert f.payload_type == PayloadType.ACCEL_F32
            assert f.values().shape == (WINDOW, 3)
            assert window_features(f.values(), metrics=metrics).shape == (48,)
        assert 0 <= labels[seq] < (10 if task == "digits" else 5)


def test_sim_is_deterministic_in_seed() -> None:
    for task, payload in (("digits", "raw"), ("vibration", "raw"), ("vibration", "features")):
        a = list(itertools.islice(samples(task, 3, payload), 5))
        b = list(itertools.islice(samples(task, 3, payload), 5))
        c = list(itertools.islice(samples(task, 4, payload), 5))
        assert a == b and a != c
    ptype, data, _ = next(samples("vibration", 0, "features"))
    assert ptype == PayloadType.F32_VECTOR and np.frombuffer(data, "<f4").shape == (48,)


def test_sim_usage_errors(tmp_path: Path) -> None:
    proc = run_cli("--task", "digits", program="edgefleet-sensor-sim")
    assert proc.returncode == 64 and "--port" in proc.stderr
    proc = run_cli("--port", "loop://", "--faults", "meteor=0.1", program="edgefleet-sensor-sim")
    assert proc.returncode == 64 and "meteor" in proc.stderr
    proc = run_cli("--port", str(tmp_path / "nope"), "--count", "1",
                   program="edgefleet-sensor-sim")
    assert proc.returncode == 64 and "cannot open" in proc.stderr


def test_sim_stops_on_sigint_even_when_started_with_it_ignored(tmp_path: Path) -> None:
    pty = tmp_path / "sensor"
    # `trap '' INT; exec` hands the sim an ignored SIGINT, as `sim &` in a script does.
    sim = subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "sim",
                            str(BIN / "edgefleet-sensor-sim"), "--task", "digits",
                            "--create-pty", str(pty), "--rate", "200"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(pty.exists, 30)
        time.sleep(1.0)  # nobody reads: the pty fills and the writer may block
        sim.send_signal(signal.SIGINT)
        assert sim.wait(15) == 0
        assert not pty.exists()
    finally:
        if sim.poll() is None:
            sim.kill()
