"""The local predict API: other programs on the device ask for predictions over a Unix socket.

Protocol (documented in docs/agent.md): one JSON object per line in each direction.
Request ``{"id": any, "input": [floats]}`` (one raw sample or a list of samples);
reply ``{"id": ..., "predictions": [{"id", "label", "label_name", "confidence", "source",
"latency_ms"}]}`` or ``{"id": ..., "error": {"code", "message"}}``. A label request
``{"id": any, "label": [{"answer": <answer id> | "input": [floats], "class": c}]}``
stores ground truth in the sample store; reply ``{"id", "labels": {"stored", "ids",
"refused": [{"index", "reason", "message"}]}}``. A bad request gets an
error reply and a counter; it never closes other connections or stops the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.core.errors import ConfigError, EdgefleetError, InputError
from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = ["MAX_REQUEST_BYTES", "LabelFn", "LocalApiServer", "PredictFn", "request"]

log = logging.getLogger(__name__)

#: Longest request line accepted; longer lines are refused without buffering them whole.
MAX_REQUEST_BYTES = 1 << 20

#: Most labels in one request (delayed ground truth comes in batches).
MAX_LABELS = 1000

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

#: Takes a batch of raw samples, returns one JSON-able dict per sample.
PredictFn = Callable[[np.ndarray], list[dict[str, Any]]]
#: Takes the items of a label request, returns what was stored and refused.
LabelFn = Callable[[list[Any]], dict[str, Any]]


def _error(req_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": req_id, "error": {"code": code, "message": message}}


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while not self.server.stopping.is_set():
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if not line:
                return
            if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                self.server.metrics.inc("api_errors_oversize")
                self._send(_error(None, "oversize", f"request longer than {MAX_REQUEST_BYTES}"))
                return  # the rest of the line is unread garbage: close this connection
            self._send(self.server.answer(line))

    def _send(self, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(json.dumps(obj).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    label: LabelFn | None = None  # set by LocalApiServer.accept_labels

    def __init__(self, path: str, predict: PredictFn, metrics: Metrics) -> None:
        self.predict = predict
        self.metrics = metrics
        self.stopping = threading.Event()
        super().__init__(path, _Handler)

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.metrics.inc("api_errors_bad_json")
            return _error(None, "bad_json", "request is not valid JSON")
        if isinstance(req, dict) and "label" in req and "input" not in req:
            return self.answer_label(req)
        if not isinstance(req, dict) or "input" not in req:
            self.metrics.inc("api_errors_bad_request")
            return _error(None, "bad_request", 'expected an object with an "input" field')
        req_id = req.get("id")
        try:
            x = np.asarray(req["input"], dtype=np.float32)
        except (TypeError, ValueError):
            self.metrics.inc("api_errors_bad_request")
            return _error(req_id, "bad_request", "input must be numbers")
        batch = x[None, :] if x.ndim == 1 else x
        try:
            preds = self.predict(batch)
        except InputError as exc:
            return _error(req_id, f"invalid_input:{exc.reason}", str(exc))
        except EdgefleetError as exc:
            self.metrics.inc("api_errors_internal")
            return _error(req_id, "unavailable", str(exc))
        except Exception:  # a bug must not take the API down
            log.exception("local API predict failed")
            self.metrics.inc("api_errors_internal")
            return _error(req_id, "internal", "internal error (see the agent log)")
        self.metrics.inc("api_requests_ok")
        return {"id": req_id, "predictions": preds}

    def answer_label(self, req: dict[str, Any]) -> dict[str, Any]:
        """``{"id", "label": item or [items]}``: labels for the sample store (docs/
        device-data.md); each item ``{"answer": id | "input": [...], "class": c}``."""
        req_id, items = req.get("id"), req["label"]
        items = items if isinstance(items, list) else [items]
        if self.label is None:
            self.metrics.inc("api_errors_bad_request")
            return _error(req_id, "unavailable", "this agent keeps no samples ([data])")
        if not items or len(items) > MAX_LABELS:
            self.metrics.inc("api_errors_bad_request")
            return _error(req_id, "bad_request", f"1..{MAX_LABELS} labels per request")
        try:
            out = self.label(items)
        except Exception:  # a bug must not take the API down
            log.exception("local API label failed")
            self.metrics.inc("api_errors_internal")
            return _error(req_id, "internal", "internal error (see the agent log)")
        self.metrics.inc("api_labels_ok")
        return {"id": req_id, "labels": out}


class LocalApiServer:
    """Serves :data:`PredictFn` on a Unix socket (mode 0660) in a background thread."""

    def __init__(self, path: Path, predict: PredictFn, metrics: Metrics | None = None) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(f"Unix socket path is {len(os.fsencode(self.path))} bytes, over "
                              f"the {MAX_SOCKET_PATH}-byte limit of AF_UNIX: set a shorter "
                              "one", path=str(self.path), key="api.socket")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a crashed run
        self._server = _Server(str(self.path), predict, metrics or default_metrics())
        os.chmod(self.path, 0o660)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="local-api",
                                        daemon=True)

    def accept_labels(self, label: LabelFn) -> LocalApiServer:
        """Answer label requests with ``label`` (the agent's sample store intake)."""
        self._server.label = label
        return self

    def start(self) -> LocalApiServer:
        """Begin serving."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, remove the socket."""
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Client helper: send one request line, read one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply
