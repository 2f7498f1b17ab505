"""Bounds for a threaded ``socketserver``: a cap on connections and a deadline per phase.

A thread per connection is simple and fine on a device or a registry, as long as a client
cannot hold threads forever. :class:`ConnectionGuard` gives a server two things:

- a cap: at most ``max_connections`` at once; one more is refused at once (the server may
  answer it with a short error first) and counted, so a flood cannot exhaust threads or
  file descriptors;
- deadlines: every admitted connection carries one (the TLS handshake and the request head
  must arrive within ``request_timeout_s``; a response must be read at a minimum rate).
  :meth:`ConnectionGuard.reap`, called from the serving loop (``service_actions``), shuts
  down the socket of a connection past its deadline, which wakes its thread whatever it is
  blocked in. This catches what a socket timeout cannot: a slowloris that sends one byte
  just before each timeout, or a reader that takes a byte at a time.

Counts go to ``<prefix>connections_refused`` and ``<prefix>connections_timed_out``.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from edgefleet.device.core.metrics import Metrics

__all__ = ["ConnectionGuard", "ConnectionLimits", "GuardedServerMixin"]


@dataclass(frozen=True)
class ConnectionLimits:
    """How many clients at once, and how long each may take."""

    max_connections: int = 64
    #: Silence allowed between two reads or writes (a socket timeout).
    idle_timeout_s: float = 15.0
    #: From accepting (or finishing the previous response) until a whole request has
    #: arrived, TLS handshake included: a slowloris is cut off after this.
    request_timeout_s: float = 30.0
    #: A response must be read at least this fast (bytes/s) after ``send_grace_s``.
    min_send_rate: float = 16 * 1024
    send_grace_s: float = 30.0

    def send_deadline(self, nbytes: int) -> float:
        """Seconds a client may take to read a response of ``nbytes``."""
        return self.send_grace_s + nbytes / self.min_send_rate


class ConnectionGuard:
    """Admits, times and reaps the connections of one server (thread-safe)."""

    def __init__(self, limits: ConnectionLimits, metrics: Metrics | None = None,
                 prefix: str = "") -> None:
        self.limits = limits
        self.metrics = metrics
        self._p = prefix
        self._lock = threading.Lock()
        #: fd -> monotonic deadline of the connection's current phase.
        self._deadlines: dict[int, float] = {}
        self.refused = 0
        self.timed_out = 0

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.inc(self._p + name)

    @property
    def active(self) -> int:
        """Connections admitted and not yet released."""
        with self._lock:
            return len(self._deadlines)

    def admit(self, sock: socket.socket) -> bool:
        """Take a slot for ``sock`` (False, counted, when the server is full)."""
        fd = sock.fileno()
        with self._lock:
            if len(self._deadlines) >= self.limits.max_connections:
                self.refused += 1
                full = True
            else:
                self._deadlines[fd] = time.monotonic() + self.limits.request_timeout_s
                full = False
        if full:
            self._count("connections_refused")
            return False
        sock.settimeout(self.limits.idle_timeout_s)
        return True

    def phase(self, sock: socket.socket, seconds: float) -> None:
        """The connection on ``sock`` must finish its current phase within ``seconds``."""
        fd = sock.fileno()
        with self._lock:
            if fd in self._deadlines:
                self._deadlines[fd] = time.monotonic() + seconds

    def release(self, fd: int) -> None:
        """Free the slot of ``fd``; call before the socket is closed (idempotent)."""
        with self._lock:
            self._deadlines.pop(fd, None)

    def reap(self) -> int:
        """Shut down every connection past its deadline; returns how many."""
        now = time.monotonic()
        reaped = 0
        with self._lock:  # held while shutting down: a released fd is never touched
            for fd, deadline in self._deadlines.items():
                if deadline > now:
                    continue
                self._deadlines[fd] = math.inf  # once; its thread releases it
                with contextlib.suppress(OSError):
                    dup = socket.socket(fileno=os.dup(fd))
                    try:
                        dup.shutdown(socket.SHUT_RDWR)
                    finally:
                        dup.close()
                reaped += 1
            self.timed_out += reaped
        for _ in range(reaped):
            self._count("connections_timed_out")
        return reaped


class GuardedServerMixin:
    """A ``socketserver`` threading server whose connections pass a :class:`ConnectionGuard`:
    over the cap a connection gets :meth:`busy_reply` (if any) and is closed; the guard's
    deadlines are enforced between polls. Put it before ``ThreadingMixIn`` in the bases."""

    guard: ConnectionGuard

    def busy_reply(self) -> bytes | None:
        """What a refused connection is told before it is closed (None: nothing)."""
        return None

    def process_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        if not self.guard.admit(sock):
            reply = self.busy_reply()
            if reply is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(0)
                    sock.send(reply)
            self.shutdown_request(sock)  # type: ignore[attr-defined]
            return
        threading.Thread(target=self.process_request_thread, args=(sock, client_address),
                         daemon=True).start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        fd = request.fileno()
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            self.handle_error(request, client_address)  # type: ignore[attr-defined]
        finally:
            self.guard.release(fd)  # before the close: the fd number may be reused
            self.shutdown_request(request)  # type: ignore[attr-defined]

    def service_actions(self) -> None:
        """Called by ``serve_forever`` between polls: cut off clients past a deadline."""
        self.guard.reap()
