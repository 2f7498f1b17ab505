"""The real registry server under abusive clients (issue 15): a cap on connections, idle
and slowloris clients cut off, slow readers cut off, large artifacts streamed in chunks."""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import pytest

from edgefleet.server.registry.http import (
    CHUNK_BYTES,
    ConnectionLimits,
    RegistryHandler,
    RegistryServer,
)
from tests.support.sockets import closed_within
from tests.support.telemetry import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(90)]

SHA = "ab" * 32


@pytest.fixture
def home(tmp_path: Path) -> tuple[Path, Path]:
    meta, art = tmp_path / "metadata", tmp_path / "artifacts"
    meta.mkdir()
    art.mkdir()
    (meta / "timestamp.json").write_bytes(b'{"signed": {}}')
    return meta, art


def _serve(home: tuple[Path, Path], **limits: Any) -> RegistryServer:
    return RegistryServer(*home, limits=ConnectionLimits(**limits)).start()


def _get(srv: RegistryServer, path: str, timeout: float = 10) -> tuple[int, bytes]:
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _open(srv: RegistryServer) -> socket.socket:
    host, port = srv.server_address[:2]
    return socket.create_connection((str(host), int(port)), timeout=10)




def test_connection_cap_refuses_the_extra_one_and_serves_again(home: tuple[Path, Path]) -> None:
    cap = 4
    srv = _serve(home, max_connections=cap, idle_timeout_s=30, request_timeout_s=30)
    idle = [_open(srv) for _ in range(cap)]
    try:
        assert wait_until(lambda: srv.guard.active == cap, 5)
        extra = _open(srv)
        extra.settimeout(5)
        try:
            reply = extra.recv(4096)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.1 503")
        extra.close()
        assert srv.guard.refused == 1
        assert srv.guard.active == cap
        for s in idle:
            s.close()
        # the server reads EOF on each, frees the slots, and serves again
        assert wait_until(lambda: srv.guard.active == 0, 5)
        assert _get(srv, "/metadata/timestamp.json") == (200, b'{"signed": {}}')
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_idle_clients_time_out(home: tuple[Path, Path]) -> None:
    srv = _serve(home, max_connections=8, idle_timeout_s=0.5, request_timeout_s=30)
    try:
        quiet = [_open(srv) for _ in range(3)]
        for s in quiet:
            assert closed_within(s, 5), "an idle client kept its connection"
            s.close()
        assert wait_until(lambda: srv.guard.active == 0, 5)
    finally:
        srv.stop()


def test_slowloris_is_cut_off_while_a_normal_client_downloads(
        home: tuple[Path, Path]) -> None:
    _meta, art = home
    blob = os.urandom(3 * 1024 * 1024)
    (art / SHA).write_bytes(blob)
    srv = _serve(home, max_connections=4, idle_timeout_s=1.0, request_timeout_s=2.0)
    loris = _open(srv)
    stop = threading.Event()
    dripped: list[int] = []

    def drip() -> None:  # one header byte every 0.3 s: never idle for the socket timeout
        data = b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000
        try:
            for b in data:
                if stop.is_set():
                    return
                loris.send(bytes([b]))
                dripped.append(b)
                time.sleep(0.3)
        except OSError:
            return

    t = threading.Thread(target=drip, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        got = []
        while time.monotonic() - t0 < 4:  # downloads keep working meanwhile
            status, body = _get(srv, f"/targets/m/{SHA}.m.tar")
            got.append(status == 200 and hashlib.sha256(body).digest()
                       == hashlib.sha256(blob).digest())
        assert got and all(got)
        t.join(10)
        assert not t.is_alive(), "the slowloris was never cut off"
        assert len(dripped) < 100
        assert srv.guard.timed_out >= 1
    finally:
        stop.set()
        loris.close()
        srv.stop()


def test_a_reader_slower_than_the_minimum_rate_is_cut_off(home: tuple[Path, Path]) -> None:
    _meta, art = home
    (art / SHA).write_bytes(os.urandom(16 * 1024 * 1024))
    srv = _serve(home, max_connections=4, idle_timeout_s=30, request_timeout_s=30,
                 min_send_rate=8 * 1024 * 1024, send_grace_s=1.0)
    s = _open(srv)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(f"GET /targets/m/{SHA}.m.tar HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.settimeout(10)
        received = 0
        while received < 64 * 1024:  # a trickle, then a stall: the server must not wait
            received += len(s.recv(1024))
            time.sleep(0.01)
        t0 = time.monotonic()
        assert wait_until(lambda: srv.guard.timed_out == 1, 10)
        assert wait_until(lambda: srv.guard.active == 0, 5)
        # 16 MiB may take 1 s + 2 s at the minimum rate; cut off near that, not in minutes
        assert time.monotonic() - t0 < 10
        assert _get(srv, "/metadata/timestamp.json")[0] == 200
    finally:
        s.close()
        srv.stop()


class _SpyFile(io.RawIOBase):
    reads: ClassVar[list[int]] = []

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def read(self, n: int = -1) -> bytes:
        _SpyFile.reads.append(n)
        return self.fh.read(n)

    def fileno(self) -> int:
        return self.fh.fileno()

    def close(self) -> None:
        self.fh.close()
        super().close()


class _SpyHandler(RegistryHandler):
    def open_file(self, path: Path) -> BinaryIO:
        return _SpyFile(super().open_file(path))  # type: ignore[return-value]


def test_large_artifact_is_streamed_in_chunks(home: tuple[Path, Path]) -> None:
    _meta, art = home
    size = 20 * 1024 * 1024 + 123
    with (art / SHA).open("wb") as fh:
        fh.truncate(size)  # sparse: no 20 MiB written to the test disk
    srv = RegistryServer(*home, handler=_SpyHandler).start()
    _SpyFile.reads = []
    try:
        host, port = srv.server_address[:2]
        conn = http.client.HTTPConnection(str(host), int(port), timeout=30)
        conn.request("GET", f"/targets/x/{SHA}.x.tar")
        r = conn.getresponse()
        assert r.status == 200 and int(r.headers["Content-Length"]) == size
        n = 0
        while block := r.read(1 << 20):
            assert block.count(0) == len(block)
            n += len(block)
        conn.close()
        assert n == size
        assert _SpyFile.reads and max(_SpyFile.reads) <= CHUNK_BYTES
        assert len(_SpyFile.reads) >= size // CHUNK_BYTES
    finally:
        srv.stop()
