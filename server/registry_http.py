"""Serve TUF metadata and model archives over HTTP (a threaded ``http.server``).

The server is deliberately dumb: devices trust nothing it says beyond what the signed
metadata vouches for, so it only needs to map URLs to files without escaping its
folders. ``/metadata/<file>`` comes from the repository's metadata folder;
``/targets/<dir>/<sha256>.<name>`` (TUF consistent-snapshot target URLs) comes straight
from the content-addressed artifact store, keyed by the sha256 in the name.
"""

from __future__ import annotations

import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

__all__ = ["RegistryHandler", "RegistryServer"]

log = logging.getLogger(__name__)

_METADATA_NAME = re.compile(r"^(?:\d+\.)?(root|targets|snapshot|timestamp)\.json$")
_TARGET_NAME = re.compile(r"^(?:[A-Za-z0-9._-]+/)*([0-9a-f]{64})\.[A-Za-z0-9._-]+$")


class RegistryHandler(BaseHTTPRequestHandler):
    """GET-only handler; tests subclass it and override :meth:`send_body` to misbehave."""

    server: RegistryServer
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-registry"
    sys_version = ""

    def resolve(self, url_path: str) -> Path | None:
        """The file behind ``url_path``, or None (404)."""
        path = url_path.split("?", 1)[0]
        if path.startswith("/metadata/"):
            name = path[len("/metadata/"):]
            if _METADATA_NAME.match(name):
                return self.server.metadata_dir / name
        elif path.startswith("/targets/"):
            m = _TARGET_NAME.match(path[len("/targets/"):])
            if m:
                return self.server.artifacts_dir / m.group(1)
        return None

    def do_GET(self) -> None:
        file = self.resolve(self.path)
        try:
            data = file.read_bytes() if file is not None else None
        except (FileNotFoundError, IsADirectoryError):
            data = None
        if data is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_body(data)

    def send_body(self, data: bytes) -> None:
        """Write ``data`` as a 200 response."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class RegistryServer(ThreadingHTTPServer):
    """An HTTP server for one registry home; ``start()`` runs it on a daemon thread."""

    daemon_threads = True

    def __init__(self, metadata_dir: Path, artifacts_dir: Path, host: str = "127.0.0.1",
                 port: int = 0, handler: type[RegistryHandler] = RegistryHandler) -> None:
        super().__init__((host, port), handler)
        self.metadata_dir = metadata_dir
        self.artifacts_dir = artifacts_dir
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8123``."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RegistryServer:
        """Serve on a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="registry-http",
                                        daemon=True)
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A device that hangs up mid-download is normal; no traceback on stderr.
        log.debug("request from %s failed", client_address, exc_info=True)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
