"""Child processes: start one with its log, watch it, stop it (and its children) for sure.

The one place edgefleet starts and stops long-running programs, on both sides:

* :class:`Child` — one program in its own session (so its process group holds whatever
  it starts too, e.g. a SuperNode's ClientApp), stdin from ``/dev/null``, stdout and
  stderr appended to a log file. :meth:`Child.stop` signals the whole group, waits, and
  escalates to SIGKILL after the timeout; the child is always reaped (no zombie).
* :class:`ProcessGroup` — named children that stop together, newest first, in parallel
  (the demo, the embedded Flower federation).
* :class:`SupervisedProcess` — a child kept running: restarted with jittered backoff
  within a restart budget (the agent's ``flower-supernode``).
* :func:`wait_port` — start-up health: wait until a child listens on a TCP port.

It lives in the base layer because the device (which may not import the server) runs a
supervised SuperNode with the same start/stop primitive the server's tools use.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edgefleet.device.core.errors import EdgefleetError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.retry import Backoff

__all__ = ["Child", "ChildExited", "ProcessGroup", "SupervisedProcess", "log_tail",
           "wait_port"]

log = logging.getLogger(__name__)


class ChildExited(EdgefleetError):
    """A child exited while it was expected to come up (see its log)."""

    exit_code = 70

    def __init__(self, child: Child) -> None:
        super().__init__(f"{child.name} exited with code {child.returncode}")
        self.child = child


class Child:
    """One running child process (see :meth:`start`); its own session and process group."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes],
                 log_path: Path | None) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @classmethod
    def start(cls, name: str, argv: Sequence[str], *, log_path: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Child:
        """Start ``argv``; output is appended to ``log_path`` (discarded when None).

        ``env`` is added to this process's environment. Raises :class:`OSError` when the
        program cannot be started.
        """
        out = log_path.open("ab") if log_path is not None else None
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                     stdout=out if out is not None else subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd,
                                     start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child has its own copy of the descriptor
        return cls(name, popen, log_path)

    @property
    def pid(self) -> int:
        """The child's PID (also its process group id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once reaped (negative: killed by that signal), else None."""
        return self.popen.returncode

    def poll(self) -> int | None:
        """Reap the child if it has exited; its exit code, or None while it runs."""
        return self.popen.poll()

    def alive(self) -> bool:
        """Whether the child is still running."""
        return self.popen.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit (:class:`subprocess.TimeoutExpired` after ``timeout``)."""
        return self.popen.wait(timeout)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (nothing if it has exited)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to the group, wait up to ``timeout``, then SIGKILL; the exit code."""
        self.send(sig)
        return self.reap(time.monotonic() + timeout)

    def reap(self, deadline: float) -> int:
        """Wait until ``deadline`` (monotonic), then SIGKILL the group; the exit code."""
        try:
            return self.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not exit in time: SIGKILL", self.name)
            self.send(signal.SIGKILL)
            return self.popen.wait()

    def tail(self, lines: int = 20) -> str:
        """The end of the child's log, for error messages."""
        return "" if self.log_path is None else log_tail(self.log_path, lines)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_port(child: Child, port: int, *, host: str = "127.0.0.1",
              timeout: float = 60.0) -> bool:
    """Wait until something accepts TCP connections on ``host:port``.

    True once it does, False after ``timeout``; raises :class:`ChildExited` as soon as
    ``child`` exits.
    """
    deadline = time.monotonic() + timeout
    backoff = Backoff(base=0.05, cap=0.5)
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildExited(child)
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return True
        time.sleep(min(backoff.next_delay(), max(0.0, deadline - time.monotonic())))
    return False


class ProcessGroup:
    """Named children; logs go to ``<logs>/<name>.log``; they stop together, newest first."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, Child] = {}

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> Child:
        """Start ``argv`` as child ``name`` (a name already running is an error)."""
        if self.alive(name):
            raise RuntimeError(f"{name} is already running")
        self.logs.mkdir(parents=True, exist_ok=True)
        child = Child.start(name, argv, log_path=self.logs / f"{name}.log", env=env, cwd=cwd)
        self.children[name] = child
        return child

    def alive(self, name: str) -> bool:
        """Whether child ``name`` is running."""
        c = self.children.get(name)
        return c is not None and c.alive()

    def send(self, name: str, sig: int) -> None:
        """Send ``sig`` to child ``name``'s process group."""
        c = self.children.get(name)
        if c is not None:
            c.send(sig)

    def stop(self, name: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        c = self.children.get(name)
        return None if c is None else c.stop(timeout, sig)

    def stop_many(self, names: Sequence[str], timeout: float = 10.0,
                  sig: int = signal.SIGTERM) -> dict[str, int | None]:
        """Signal all of ``names`` at once, then reap them (parallel, not one by one)."""
        children = [(n, self.children[n]) for n in names if n in self.children]
        for _, c in children:
            c.send(sig)
        deadline = time.monotonic() + timeout
        return {n: c.reap(deadline) for n, c in children}

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first."""
        self.stop_many(list(reversed(self.children)), timeout)

    def pop(self, name: str) -> Child | None:
        """Forget child ``name`` (stop it first) and return it."""
        return self.children.pop(name, None)

    def tail(self, name: str, lines: int = 20) -> str:
        """The end of child ``name``'s log, for error messages."""
        c = self.children.get(name)
        return "" if c is None else c.tail(lines)


class SupervisedProcess:
    """Keeps ``argv`` running: restarts it with jittered backoff until :meth:`stop`.

    A child that keeps dying fast exhausts the budget (default 5 restarts in 60 s, as
    Frigate's watchdog) and is then left down, loudly (``gave_up``), instead of
    crash-looping and burning a Pi's CPU. Every start is a :class:`Child`.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        backoff: Backoff | None = None,
        max_restarts: int = 5,
        window_s: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.metrics = metrics or default_metrics()
        self.child: Child | None = None
        self.gave_up = False
        self._stop = threading.Event()
        self._restarts: collections.deque[float] = collections.deque()
        self._thread = threading.Thread(target=self._run, name=f"supervise-{name}", daemon=True)

    def start(self) -> SupervisedProcess:
        """Start the child and its watcher thread."""
        self._thread.start()
        return self

    @property
    def pid(self) -> int | None:
        """PID of the running child, if any."""
        child = self.child
        return child.pid if child is not None and child.alive() else None

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.child = Child.start(self.name, self.argv, log_path=self.log_path,
                                         env=self.env, cwd=self.cwd)
            except OSError as exc:
                log.error("%s: cannot start: %s", self.name, exc)
                self.metrics.inc(f"{self.name}_spawn_errors")
                rc: int | None = None
            else:
                self.metrics.set(f"{self.name}_pid", self.child.pid)
                rc = self.child.wait()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if now - started > self.window_s:
                self.backoff.reset()
            self._restarts.append(now)
            while self._restarts and now - self._restarts[0] > self.window_s:
                self._restarts.popleft()
            self.metrics.inc(f"{self.name}_restarts")
            if len(self._restarts) > self.max_restarts:
                log.error("%s exited (rc=%s) %d times in %.0f s: giving up", self.name, rc,
                          len(self._restarts), self.window_s)
                self.gave_up = True
                self.metrics.set(f"{self.name}_state", "gave_up")
                return
            delay = self.backoff.next_delay()
            log.warning("%s exited (rc=%s); restarting in %.1f s", self.name, rc, delay)
            self._stop.wait(delay)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the child's process group, SIGKILL after ``timeout``; stop restarting."""
        self._stop.set()
        child = self.child
        if child is not None and child.alive():
            child.stop(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)
