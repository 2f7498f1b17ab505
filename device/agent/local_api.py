"""The local predict API: other programs on the device ask for predictions over a Unix socket.

Protocol (documented in docs/agent.md): one JSON object per line in each direction.
Request ``{"id": any, "input": [floats]}`` (one raw sample or a list of samples: a flat
row, or nested lists in the model's input shape, docs/bring-your-own-model.md) or
``{"id": any, "image": "<base64 of raw uint8 values in the model's layout>"}``;
reply ``{"id": ..., "predictions": [{"id", "label", "label_name", "confidence", "source",
"latency_ms"}]}`` or ``{"id": ..., "error": {"code", "message"}}``. A label request
``{"id": any, "label": [{"answer": <answer id> | "input": [floats], "class": c}]}``
stores ground truth in the sample store; reply ``{"id", "labels": {"stored", "ids",
"refused": [{"index", "reason", "message"}]}}``. A bad request gets an
error reply and a counter; it never closes other connections or stops the server.

Bounds (:class:`~edgefleet.device.core.conn_guard.ConnectionLimits`, counters ``api_...``):
at most ``max_connections`` clients at once (one more gets a ``busy`` error line and is
closed: ``api_connections_refused``); a client silent for ``idle_timeout_s``, one whose
request line takes longer than ``request_timeout_s`` to arrive (slowloris), or one that
does not read its replies is cut off (``api_connections_timed_out``).

The socket is created with its final mode: it is bound inside a fresh 0700 folder next to
its path, set to 0660 and renamed into place, so there is no moment at which it exists
with the process umask's looser mode.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.core.conn_guard import (
    ConnectionGuard,
    ConnectionLimits,
    GuardedServerMixin,
)
from edgefleet.device.core.errors import ConfigError, EdgefleetError, InputError
from edgefleet.device.core.guarded_json import JsonLimits, JsonRejected, loads_guarded
from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = ["DEFAULT_LIMITS", "MAX_LABELS", "MAX_REQUEST_BYTES", "SOCKET_MODE", "LabelFn",
           "LocalApiServer", "PredictFn", "answer", "request"]

log = logging.getLogger(__name__)

#: Longest request line accepted; longer lines are refused without buffering them whole.
MAX_REQUEST_BYTES = 1 << 20

#: Most labels in one request (delayed ground truth comes in batches).
MAX_LABELS = 1000

#: One request line: ``{"id", "input": row | rows}`` or ``{"id", "label": [items]}``.
REQUEST_LIMITS = JsonLimits(max_bytes=MAX_REQUEST_BYTES, max_depth=6,
                            max_keys=3 * MAX_LABELS + 16, max_list=1 << 17,
                            max_string=MAX_REQUEST_BYTES)

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: Owner and group (the device's apps) may connect; nobody else.
SOCKET_MODE = 0o660
#: Local clients are few: 32 at once, each silent for at most 30 s.
DEFAULT_LIMITS = ConnectionLimits(max_connections=32, idle_timeout_s=30.0,
                                  request_timeout_s=30.0, min_send_rate=64 * 1024,
                                  send_grace_s=10.0)
#: Bytes the private bind folder adds to the socket path: ``/.XXXXXXXX/s``.
_PRIVATE_EXTRA = 12

#: Takes raw input (a batch of rows, one sample or a batch in the model's input shape),
#: returns one JSON-able dict per sample.
PredictFn = Callable[[np.ndarray], list[dict[str, Any]]]
#: Takes the items of a label request, returns what was stored and refused.
LabelFn = Callable[[list[Any]], dict[str, Any]]


def _error(req_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": req_id, "error": {"code": code, "message": message}}


def answer_label(req: dict[str, Any], label: LabelFn | None,
                 metrics: Metrics) -> dict[str, Any]:
    """``{"id", "label": item or [items]}``: labels for the sample store (docs/
    device-data.md); each item ``{"answer": id | "input": [...], "class": c}``."""
    req_id, items = req.get("id"), req["label"]
    items = items if isinstance(items, list) else [items]
    if label is None:
        metrics.inc("api_errors_bad_request")
        return _error(req_id, "unavailable", "this agent keeps no samples ([data])")
    if not items or len(items) > MAX_LABELS:
        metrics.inc("api_errors_bad_request")
        return _error(req_id, "bad_request", f"1..{MAX_LABELS} labels per request")
    try:
        out = label(items)
    except Exception:  # a bug must not take the API down
        log.exception("local API label failed")
        metrics.inc("api_errors_internal")
        return _error(req_id, "internal", "internal error (see the agent log)")
    metrics.inc("api_labels_ok")
    return {"id": req_id, "labels": out}


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        guard, limits = self.server.guard, self.server.guard.limits
        try:
            while not self.server.stopping.is_set():
                guard.phase(self.connection, limits.request_timeout_s)
                line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST_BYTES and not line.endswith(b"\n"):
                    self.server.metrics.inc("api_errors_oversize")
                    self._send(_error(None, "oversize",
                                      f"request longer than {MAX_REQUEST_BYTES}"))
                    return  # the rest of the line is unread garbage: close this connection
                self._send(self.server.answer(line))
        except TimeoutError:  # silent for idle_timeout_s
            self.server.metrics.inc("api_connections_timed_out")
        except OSError:  # hung up, or shut down by the guard (counted there)
            pass

    def _send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.server.guard.phase(self.connection, self.server.guard.limits.send_deadline(
            len(data)))
        self.wfile.write(data)
        self.wfile.flush()


def answer(line: bytes, predict: PredictFn, metrics: Metrics,
           label: LabelFn | None = None) -> dict[str, Any]:
    """The reply to one request line; never raises (a bad request is an error reply)."""
    try:
        req = loads_guarded(line, REQUEST_LIMITS)
    except JsonRejected as exc:  # not JSON, not UTF-8, too deep or large, NaN/Infinity
        metrics.inc("api_errors_bad_json")
        return _error(None, "bad_json", f"request refused ({exc.reason}): {exc}")
    if isinstance(req, dict) and "label" in req and "input" not in req:
        return answer_label(req, label, metrics)
    if isinstance(req, dict) and "image" in req and "input" not in req:
        req_id = req.get("id")
        try:
            batch = _image(req["image"])
        except ValueError as exc:
            metrics.inc("api_errors_bad_request")
            return _error(req_id, "bad_request", str(exc))
    elif not isinstance(req, dict) or "input" not in req:
        metrics.inc("api_errors_bad_request")
        return _error(None, "bad_request", 'expected an object with an "input" or "image" '
                      'field')
    else:
        req_id = req.get("id")
        try:
            with np.errstate(over="ignore"):  # beyond float32 is inf: refused as nonfinite
                x = np.asarray(req["input"], dtype=np.float32)
        except (TypeError, ValueError, OverflowError, RecursionError):
            metrics.inc("api_errors_bad_request")
            return _error(req_id, "bad_request", "input must be numbers (nested lists in "
                          "the model's input shape)")
        # A flat list is one row; anything else the model's input spec sorts out.
        batch = x[None, :] if x.ndim == 1 else x
    try:
        preds = predict(batch)
    except InputError as exc:
        return _error(req_id, f"invalid_input:{exc.reason}", str(exc))
    except EdgefleetError as exc:
        metrics.inc("api_errors_internal")
        return _error(req_id, "unavailable", str(exc))
    except Exception:  # a bug must not take the API down
        log.exception("local API predict failed")
        metrics.inc("api_errors_internal")
        return _error(req_id, "internal", "internal error (see the agent log)")
    metrics.inc("api_requests_ok")
    return {"id": req_id, "predictions": preds}


def _image(value: Any) -> np.ndarray:
    """``"image"``: base64 of raw uint8 values, one sample in the model's layout (no PNG:
    the device has no image decoder), as a ``(1, n)`` row; ``ValueError`` if it is not."""
    if not isinstance(value, str):
        raise ValueError("image must be a base64 string of raw uint8 values")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image is not valid base64") from None
    if not data:
        raise ValueError("image is empty")
    return np.frombuffer(data, dtype=np.uint8)[None, :]


class _Server(GuardedServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 64
    label: LabelFn | None = None  # set by LocalApiServer.accept_labels

    def __init__(self, path: str, predict: PredictFn, metrics: Metrics,
                 limits: ConnectionLimits) -> None:
        self.predict = predict
        self.metrics = metrics
        self.stopping = threading.Event()
        self.guard = ConnectionGuard(limits, metrics, prefix="api_")
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        """Bind in a private 0700 folder, chmod, rename into place: never world-reachable."""
        final = str(self.server_address)
        private = tempfile.mkdtemp(prefix=".", dir=os.path.dirname(final) or ".")
        tmp = os.path.join(private, "s")
        try:
            self.socket.bind(tmp)
            os.chmod(tmp, SOCKET_MODE)
            os.replace(tmp, final)  # also replaces a stale socket of a crashed run
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.rmdir(private)
        self.server_address = final

    def busy_reply(self) -> bytes:
        return json.dumps(_error(None, "busy", "too many connections")).encode() + b"\n"

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("local API connection failed")

    def answer(self, line: bytes) -> dict[str, Any]:
        return answer(line, self.predict, self.metrics, self.label)


class LocalApiServer:
    """Serves :data:`PredictFn` on a Unix socket (mode 0660) in a background thread."""

    def __init__(self, path: Path, predict: PredictFn, metrics: Metrics | None = None,
                 limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        self.path = Path(path)
        longest = max(len(os.fsencode(self.path)),
                      len(os.fsencode(self.path.parent)) + _PRIVATE_EXTRA)
        if longest > MAX_SOCKET_PATH:
            raise ConfigError(f"Unix socket path needs {longest} bytes, over the "
                              f"{MAX_SOCKET_PATH}-byte limit of AF_UNIX: set a shorter one",
                              path=str(self.path), key="api.socket")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = _Server(str(self.path), predict, metrics or default_metrics(), limits)
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
        if self._thread.is_alive():
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
