"""Keep a child process running: restart it with jittered backoff, within a restart budget.

The agent runs ``flower-supernode`` this way. A child that keeps dying fast exhausts the
budget (default 5 restarts in 60 s, as Frigate's watchdog) and is then left down,
loudly, instead of crash-looping and burning the Pi's CPU.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.core.retry import Backoff

__all__ = ["SupervisedProcess"]

log = logging.getLogger(__name__)


class SupervisedProcess:
    """Runs ``argv`` in its own session; restarts it when it exits until :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        backoff: Backoff | None = None,
        max_restarts: int = 5,
        window_s: float = 60.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.metrics = metrics or default_metrics()
        self.proc: subprocess.Popen[bytes] | None = None
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
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def _spawn(self) -> subprocess.Popen[bytes]:
        out = self.log_path.open("ab") if self.log_path else None
        try:
            return subprocess.Popen(self.argv,
                                    stdout=out if out is not None else subprocess.DEVNULL,
                                    stderr=subprocess.STDOUT,
                                    env={**os.environ, **(self.env or {})},
                                    start_new_session=True)
        finally:
            if out is not None:
                out.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.proc = self._spawn()
            except OSError as exc:
                log.error("%s: cannot start: %s", self.name, exc)
                self.metrics.inc(f"{self.name}_spawn_errors")
                rc: int | None = None
            else:
                self.metrics.set(f"{self.name}_pid", self.proc.pid)
                rc = self.proc.wait()
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
        proc = self.proc
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)
