"""The serial reader on real pseudo-terminals: delivery, faults, unplug and replug."""

from __future__ import annotations

import contextlib
import os
import queue
import time
from pathlib import Path

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.retry import Backoff
from edgefleet.device.input.serial_reader import SerialReader, open_port
from edgefleet.device.wire.frames import Frame, PayloadType, encode_frame
from edgefleet.models.sim.serial_faults import FaultInjector, Faults
from tests.device.serial_support import PtyPair, wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]


def _frames(n: int, start: int = 0) -> list[bytes]:
    return [encode_frame(3, i, 1_000 * i, PayloadType.U8_VECTOR, bytes(range(1, 65)))
            for i in range(start, start + n)]


def _drain(q: queue.Queue[Frame], n: int, timeout: float = 10.0) -> list[Frame]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            out.append(q.get(timeout=0.1))
    return out


def test_reader_on_openpty_with_faults(tmp_path: Path) -> None:
    master, slave = os.openpty()
    metrics = Metrics()
    q: queue.Queue[Frame] = queue.Queue()
    reader = SerialReader(os.ttyname(slave), q.put, metrics=metrics).start()
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        inj = FaultInjector(Faults(bitflip=0.1, truncate=0.05, garbage=0.1, pause=0.05,
                                   pause_s=0.05), seed=11)
        untouched = set()
        for i, wire in enumerate(_frames(200)):
            chunks, touched = inj.apply(wire)
            if not touched:
                untouched.add(i)
            for c in chunks:
                if isinstance(c, float):
                    time.sleep(c)
                else:
                    os.write(master, c)
        os.write(master, b"\x00" + b"\x55" * 40_000 + b"\x00")  # a babbling sensor
        os.write(master, _frames(1, start=200)[0])
        got = _drain(q, len(untouched) + 1)
        seqs = {f.seq for f in got}
        assert untouched | {200} <= seqs
        c = metrics.snapshot()["counters"]
        assert c["serial_frames_ok"] == len(got)
        assert c["serial_oversize"] == 1
        assert c["serial_resyncs"] >= 200 - len(untouched)
        assert c.get("serial_crc_errors", 0) + c.get("serial_malformed", 0) >= 1
        assert c["serial_seq_gaps"] >= 1
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)


def test_handler_error_does_not_stop_reading(tmp_path: Path) -> None:
    master, slave = os.openpty()
    metrics = Metrics()
    seen: list[int] = []

    def handler(f: Frame) -> None:
        seen.append(f.seq)
        if f.seq == 1:
            raise RuntimeError("bug in a handler")

    reader = SerialReader(os.ttyname(slave), handler, metrics=metrics).start()
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        os.write(master, b"".join(_frames(3)))
        wait_until(lambda: len(seen) == 3, what="three frames")
        assert metrics.counter("serial_handler_errors") == 1
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)


@pytest.mark.slow
def test_unplug_and_replug_socat(tmp_path: Path) -> None:
    pair = PtyPair(tmp_path).plug()
    metrics = Metrics()
    q: queue.Queue[Frame] = queue.Queue()
    reader = SerialReader(str(pair.b), q.put, metrics=metrics,
                          backoff=Backoff(base=0.05, cap=0.5)).start()
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        port = open_port(str(pair.a))
        port.write(b"".join(_frames(20)))
        port.flush()
        assert [f.seq for f in _drain(q, 20)] == list(range(20))
        # Unplug mid-frame: the half frame must not be glued to what comes after replug.
        port.write(_frames(1, start=20)[0][:30])
        port.flush()
        time.sleep(0.2)
        port.close()
        pair.unplug()
        wait_until(lambda: metrics.counter("serial_disconnects") == 1, what="disconnect")
        time.sleep(0.5)  # the port stays away for a while; the reader keeps retrying
        assert metrics.counter("serial_open_failures") >= 1
        pair.plug()
        wait_until(lambda: metrics.counter("serial_reconnects") == 1, what="reconnect")
        port = open_port(str(pair.a))
        port.write(b"".join(_frames(20, start=30)))
        port.flush()
        assert [f.seq for f in _drain(q, 20)] == list(range(30, 50))
        port.close()
        c = metrics.snapshot()["counters"]
        assert c["serial_frames_ok"] == 40
        assert c["serial_seq_gaps"] == 1 and c["serial_frames_missed"] == 10
        assert q.empty()
    finally:
        reader.stop()
        pair.unplug()


def test_reader_on_pyserial_socket_url_reconnects() -> None:
    """``socket://`` URL: a sensor gateway that drops the connection and comes back."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.settimeout(10)
    metrics = Metrics()
    q: queue.Queue[Frame] = queue.Queue()
    reader = SerialReader(f"socket://127.0.0.1:{port}", q.put, metrics=metrics,
                          backoff=Backoff(base=0.05, cap=0.3)).start()
    try:
        for start in (0, 10):
            conn, _ = srv.accept()
            # pyserial discards what arrives while it opens the port: wait until it is open.
            wait_until(lambda s=start: reader.connected.is_set()
                       and metrics.counter("serial_reconnects") == s // 10, what="open")
            conn.sendall(b"".join(_frames(10, start=start)))
            assert [f.seq for f in _drain(q, 10)] == list(range(start, start + 10))
            conn.close()
            wait_until(lambda: not reader.connected.is_set(), what="disconnect")
        assert metrics.counter("serial_disconnects") >= 1
        assert metrics.counter("serial_frames_ok") == 20
    finally:
        reader.stop()
        srv.close()


def test_valid_crc_odd_length_frames_are_counted_not_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 15: a frame with a valid CRC but 7 bytes of float32 used to raise in the
    handler on every frame (a traceback each time); now the decoder rejects and counts it."""
    from tests.device.test_frames import raw_frame

    master, slave = os.openpty()
    metrics = Metrics()
    values: list[int] = []

    def handler(f: Frame) -> None:  # what the agent does with each frame
        values.append(f.seq)
        f.values()

    reader = SerialReader(os.ttyname(slave), handler, metrics=metrics).start()
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        good = 0
        for i in range(150):
            if i % 3 == 1:
                os.write(master, raw_frame(4, 10_000 + i, PayloadType.F32_VECTOR,
                                           bytes(range(1, 8))))
            elif i % 3 == 2:
                os.write(master, raw_frame(4, 20_000 + i, PayloadType.ACCEL_F32, bytes(20)))
            else:
                os.write(master, encode_frame(4, i, i, PayloadType.F32_VECTOR, bytes(32)))
                good += 1
        wait_until(lambda: len(values) == good
                   and metrics.counter("serial_bad_payload") == 100, what="all frames")
        assert values == list(range(0, 150, 3))
        c = metrics.snapshot()["counters"]
        assert c["serial_frames_ok"] == good
        assert c.get("serial_handler_errors", 0) == 0
        assert not [r for r in caplog.records if r.exc_info]
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)


def test_a_failing_handler_logs_one_traceback_then_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    master, slave = os.openpty()
    metrics = Metrics()

    def handler(f: Frame) -> None:
        raise RuntimeError(f"bug on {f.seq}")

    reader = SerialReader(os.ttyname(slave), handler, metrics=metrics).start()
    try:
        wait_until(reader.connected.is_set, what="reader to open the pty")
        os.write(master, b"".join(_frames(20)))
        wait_until(lambda: metrics.counter("serial_handler_errors") == 20, what="20 errors")
        assert len([r for r in caplog.records if r.exc_info]) == 1
    finally:
        reader.stop()
        os.close(master)
        os.close(slave)
