"""Serve TUF metadata and model archives over HTTP or HTTPS (a threaded ``http.server``).

The server is deliberately dumb: devices trust nothing it says beyond what the signed
metadata vouches for, so it only needs to map URLs to files without escaping its
folders. ``/metadata/<file>`` comes from the repository's metadata folder;
``/targets/<dir>/<sha256>.<name>`` (TUF consistent-snapshot target URLs) comes straight
from the content-addressed artifact store, keyed by the sha256 in the name.

TUF already makes the bytes tamper-proof; TLS adds what TUF does not: confidentiality
of the models and of which version each device fetches. The TLS handshake runs on the
connection's own thread (not in ``accept``), so a client that never finishes it cannot
stall the others.

Mutual TLS (optional, :func:`server_tls_context` with ``client_ca``) decides who may
download at all: the handshake requires a client certificate issued by the fleet CA
(``ssl.CERT_REQUIRED``), and :class:`ClientAllowList` then admits only the certificates
of devices enrolled now. Revocation is their removal from that list, a file the fleet
home rewrites on enroll and revoke and the server re-reads when it changes (no restart,
no CRL to keep from expiring); a refused device gets ``403`` with the reason.

Bounds (:class:`~edgefleet.device.core.conn_guard.ConnectionLimits`): at most
``max_connections`` clients at once (one more gets a 503 over plain HTTP, or is closed,
and is counted in ``connections_refused``); a client silent for ``idle_timeout_s``, or
whose handshake and request head take longer than ``request_timeout_s`` (slowloris), or
who reads a response slower than ``min_send_rate`` is cut off (``connections_timed_out``).
Files are streamed in :data:`CHUNK_BYTES` pieces, so memory does not grow with the size
of a model.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from edgefleet.device.core.conn_guard import (
    ConnectionGuard,
    ConnectionLimits,
    GuardedServerMixin,
)
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.prom_text import labelled
from edgefleet.server.fleet.pki import cert_fingerprint

__all__ = ["CHUNK_BYTES", "ClientAllowList", "ConnectionLimits", "RegistryHandler",
           "RegistryServer", "cert_fingerprint", "server_tls_context"]

log = logging.getLogger(__name__)

#: Bounds (s) of ``registry_request_seconds``: metadata in ms, packages up to minutes.
REQUEST_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)
_METADATA_NAME = re.compile(r"^(?:\d+\.)?(root|targets|snapshot|timestamp)\.json$")
_TARGET_NAME = re.compile(r"^(?:[A-Za-z0-9._-]+/)*([0-9a-f]{64})\.[A-Za-z0-9._-]+$")
#: Files are sent in pieces of this size (memory per download, whatever the file size).
CHUNK_BYTES = 64 * 1024
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


def server_tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or newer) for ``cert`` (PEM chain) and its ``key``.

    With ``client_ca`` every client must present a certificate that CA issued.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ClientAllowList:
    """Fingerprints of the client certificates that may download, from a text file.

    One hex sha256 per line, anything after it (``# device name``) ignored. The file is
    re-read when its identity, size or mtime changes, so enrolling or revoking a device
    takes effect on the next connection. A missing or unreadable file admits no one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._allowed: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def allowed(self) -> frozenset[str]:
        """The current fingerprints (re-read if the file changed)."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._allowed = self._read() if stamp is not None else frozenset()
                self._stamp = stamp
            return self._allowed

    def _read(self) -> frozenset[str]:
        try:
            lines = self.path.read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            return frozenset()
        fps = (line.split("#", 1)[0].strip().lower() for line in lines)
        return frozenset(fp for fp in fps if re.fullmatch(r"[0-9a-f]{64}", fp))

    def admits(self, der: bytes | None) -> bool:
        """Whether the certificate ``der`` is on the list."""
        return der is not None and cert_fingerprint(der) in self.allowed()


def _linger(conn: ssl.SSLSocket) -> None:
    """Let the TLS alert reach the client before the socket closes.

    Under TLS 1.3 a client whose certificate is refused has already sent its request;
    closing with that unread would reset the connection and the client would see a bare
    EOF instead of the alert that says why (``certificate required``, ``unknown ca``).
    So: half-close, and read what the client still sends, briefly and boundedly.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(0.5)
        for _ in range(16):
            if not conn.recv(4096):
                break
    except OSError:
        pass


class RegistryHandler(BaseHTTPRequestHandler):
    """GET-only handler; tests subclass it and override :meth:`send_body` to misbehave."""

    server: RegistryServer
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-registry"
    sys_version = ""
    # Headers and body go out as two writes (two TLS records); with Nagle on, the second
    # waits for the client's delayed ACK, ~40 ms per response over HTTPS.
    disable_nagle_algorithm = True

    def resolve(self, url_path: str) -> Path | None:
        """The file behind ``url_path``, or None (404)."""
        path = url_path.split("?", 1)[0]
        if path.startswith("/metadata/"):
            name = path[len("/metadata/"):]
            if _METADATA_NAME.fullmatch(name):
                return self.server.metadata_dir / name
        elif path.startswith("/targets/"):
            m = _TARGET_NAME.fullmatch(path[len("/targets/"):])
            if m:
                return self.server.artifacts_dir / m.group(1)
        return None

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.idle_timeout_s)

    def handle_one_request(self) -> None:
        # The next request (line and headers) must arrive within request_timeout_s.
        self.server.guard.phase(self.connection, self.server.limits.request_timeout_s)
        super().handle_one_request()

    def open_file(self, path: Path) -> BinaryIO:
        """Open ``path`` for reading (unbuffered: each read is one chunk)."""
        return path.open("rb", buffering=0)

    def admitted(self) -> bool:
        """Whether this client may download (always, unless the server has an allow-list).

        Checked per request, so a revocation also ends a kept-alive connection's use.
        """
        clients = self.server.clients
        if clients is None:
            return True
        conn = self.connection
        der = conn.getpeercert(binary_form=True) if isinstance(conn, ssl.SSLSocket) else None
        if clients.admits(der):
            return True
        self.server.clients_refused += 1
        log.warning("refused %s: client certificate not enrolled", self.address_string())
        self.close_connection = True
        self.send_error(HTTPStatus.FORBIDDEN, "client certificate not enrolled",
                        "This device's certificate is not on the registry's list of enrolled "
                        "devices (revoked, or enrolled in another fleet).")
        return False

    def file_kind(self) -> str:
        """What the request asks for, as the label of its metrics: ``metadata`` (TUF
        role files), ``target`` (package archives) or ``other`` (a 404)."""
        path = self.path.split("?", 1)[0]
        return ("metadata" if path.startswith("/metadata/")
                else "target" if path.startswith("/targets/") else "other")

    def send_response(self, code: int, message: str | None = None) -> None:
        self._code = int(code)
        super().send_response(code, message)

    def do_GET(self) -> None:
        t0 = time.perf_counter()
        self._code = 0
        try:
            self._get()
        finally:
            kind, m = self.file_kind(), self.server.metrics
            m.inc(labelled("registry_requests", kind=kind, code=str(self._code)))
            m.observe(labelled("registry_request_seconds", kind=kind),
                      time.perf_counter() - t0, REQUEST_BUCKETS_S)

    def _get(self) -> None:
        if not self.admitted():
            return
        file = self.resolve(self.path)
        try:
            fh = self.open_file(file) if file is not None else None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            fh = None
        if fh is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with fh:
            size = os.fstat(fh.fileno()).st_size
            self.server.guard.phase(self.connection, self.server.limits.send_deadline(size))
            self.send_file(fh, size)

    def send_file(self, fh: BinaryIO, size: int) -> None:
        """Stream ``size`` bytes of ``fh`` as a 200 response, :data:`CHUNK_BYTES` at a time."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        left = size
        while left > 0:
            block = fh.read(min(CHUNK_BYTES, left))
            if not block:  # the file shrank under us: the client sees a short body
                self.close_connection = True
                return
            self.wfile.write(block)
            left -= len(block)

    def send_body(self, data: bytes) -> None:
        """Write ``data`` (held in memory: small bodies only) as a 200 response."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class RegistryServer(GuardedServerMixin, ThreadingHTTPServer):
    """An HTTP(S) server for one registry home; ``start()`` runs it on a daemon thread.

    With ``tls`` (see :func:`server_tls_context`) every connection must speak TLS; with
    ``clients`` as well (and a ``tls`` that requires client certificates), only clients
    whose certificate is on that allow-list are served.
    ``limits`` bounds connections and their durations (see the module docstring).
    """

    daemon_threads = True
    #: Connections waiting for ``accept``; past the cap they are accepted and refused.
    request_queue_size = 128

    def __init__(self, metadata_dir: Path, artifacts_dir: Path, host: str = "127.0.0.1",
                 port: int = 0, handler: type[RegistryHandler] = RegistryHandler,
                 tls: ssl.SSLContext | None = None,
                 limits: ConnectionLimits | None = None,
                 clients: ClientAllowList | None = None,
                 metrics: Metrics | None = None) -> None:
        if clients is not None and (tls is None or tls.verify_mode != ssl.CERT_REQUIRED):
            raise ValueError("a client allow-list needs TLS that requires client certificates")
        super().__init__((host, port), handler)
        self.metadata_dir = metadata_dir
        self.artifacts_dir = artifacts_dir
        self.tls = tls
        self.limits = limits or ConnectionLimits()
        #: Counts ``refused`` (over the cap) and ``timed_out`` (idle, slowloris, slow reader).
        self.guard = ConnectionGuard(self.limits)
        #: Connections dropped because their TLS handshake failed (wrong CA, plain HTTP).
        self.tls_handshake_failures = 0
        self.clients = clients
        #: Connections with a fleet certificate that is not (or no longer) enrolled.
        self.clients_refused = 0
        self._thread: threading.Thread | None = None
        #: Requests by file kind and status, and their durations (``/metrics``).
        self.metrics = metrics if metrics is not None else Metrics()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123`` (``https://`` with TLS)."""
        host, port = self.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host!s}:{port}"

    def busy_reply(self) -> bytes | None:
        """503 to a plain-HTTP client over the cap (a TLS client gets a closed socket)."""
        return _BUSY if self.tls is None else None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        raw: socket.socket = request
        fd = raw.fileno()
        conn = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.tls_handshake_failures += 1
            log.info("TLS handshake with %s failed: %s", client_address, exc)
            _linger(conn)
            self.guard.release(fd)
            conn.close()
            return
        try:
            super().finish_request(conn, client_address)
        finally:
            self.guard.release(fd)
            conn.close()

    def start(self) -> RegistryServer:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="registry-http", daemon=True)
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A device that hangs up mid-download is normal; no traceback on stderr.
        log.debug("request from %s failed", client_address, exc_info=True)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
