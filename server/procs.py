"""A named group of child processes that stop together, also on Ctrl-C.

The demo and the end-to-end tests start many real processes (broker, SuperLink,
ingest, scorer, registry, agents, sensor simulators). Each runs in its own session
with its output in a log file; :meth:`ProcessGroup.stop_all` signals whole process
groups (a SuperNode's ClientApp children included), newest first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["ProcessGroup"]


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path


class ProcessGroup:
    """Children started with :meth:`start`; logs go to ``<logs>/<name>.log``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, _Child] = {}

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` as child ``name`` (a name already running is an error)."""
        if name in self.children and self.children[name].popen.poll() is None:
            raise RuntimeError(f"{name} is already running")
        path = self.logs / f"{name}.log"
        log = path.open("ab")
        popen = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                 cwd=cwd, start_new_session=True)
        self.children[name] = _Child(name, popen, log, path)
        return popen

    def alive(self, name: str) -> bool:
        """Whether child ``name`` is running."""
        c = self.children.get(name)
        return c is not None and c.popen.poll() is None

    def send(self, name: str, sig: int) -> None:
        """Send ``sig`` to child ``name``'s process group."""
        c = self.children.get(name)
        if c is not None and c.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.popen.pid, sig)

    def stop(self, name: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Signal, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        c = self.children.get(name)
        if c is None:
            return None
        self.send(name, sig)
        try:
            rc = c.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(name, signal.SIGKILL)
            rc = c.popen.wait()
        c.log.close()
        return rc

    def stop_many(self, names: Sequence[str], timeout: float = 10.0,
                  sig: int = signal.SIGTERM) -> dict[str, int | None]:
        """Signal all of ``names`` at once, then reap them (parallel, not one by one)."""
        for n in names:
            self.send(n, sig)
        end = time.monotonic() + timeout
        out: dict[str, int | None] = {}
        for n in names:
            c = self.children.get(n)
            if c is None:
                continue
            try:
                out[n] = c.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.send(n, signal.SIGKILL)
                out[n] = c.popen.wait()
            c.log.close()
        return out

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first."""
        self.stop_many(list(reversed(self.children)), timeout)

    def tail(self, name: str, lines: int = 20) -> str:
        """The end of child ``name``'s log, for error messages."""
        c = self.children.get(name)
        if c is None or not c.log_path.exists():
            return ""
        return "\n".join(c.log_path.read_text(errors="replace").splitlines()[-lines:])
