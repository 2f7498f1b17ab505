"""``edgefleet server up``'s supervisor: every service of :func:`.services.plan`, kept running.

The supervisor is one process (``edgefleet server supervise``, started detached by
``server up``) that runs each service as a :class:`SupervisedProcess` (restart budget
from ``[server] max_restarts`` / ``restart_window_s``, logs in ``<home>/logs``) and
writes what it sees to ``<home>/run/status.json`` about once a second; ``server status``
reads that file, ``server down`` SIGTERMs the pid in ``<home>/run/server.pid``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.process import SupervisedProcess
from edgefleet.device.core.retry import Backoff
from edgefleet.server.fleet.home import FleetHome
from edgefleet.server.fleet.services import Service, plan, write_mosquitto_conf

__all__ = ["FleetServer", "read_status", "server_pid"]

log = logging.getLogger(__name__)

#: A service without a port counts as up once its process has lived this long.
SETTLE_S = 2.0


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
        return True
    return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def server_pid(home: FleetHome) -> int | None:
    """PID of the running supervisor of ``home`` (None when none runs)."""
    path = home.root / "run" / "server.pid"
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def read_status(home: FleetHome) -> dict[str, Any] | None:
    """The supervisor's last status (None when it never wrote one)."""
    try:
        data: dict[str, Any] = json.loads((home.root / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FleetServer:
    """Runs the home's services until :meth:`run`'s stop event is set."""

    def __init__(self, home: FleetHome, services: list[Service] | None = None) -> None:
        self.home = home
        self.services = services if services is not None else plan(home)
        self.procs: dict[str, SupervisedProcess] = {}
        self.metrics = Metrics()
        self._born: dict[str, tuple[int, float, bool]] = {}
        self._mosquitto_pid: int | None = None

    def _start(self, svc: Service) -> None:
        srv = self.home.settings.server
        proc = SupervisedProcess(
            svc.name, svc.argv, log_path=self.home.logs_dir / f"{svc.name}.log",
            env=svc.env, cwd=svc.cwd, max_restarts=srv.max_restarts,
            window_s=srv.restart_window_s, backoff=Backoff(base=0.5, cap=10.0),
            metrics=self.metrics)
        self.procs[svc.name] = proc.start()

    def _state(self, svc: Service) -> dict[str, Any]:
        proc = self.procs.get(svc.name)
        restarts = int(self.metrics.snapshot()["counters"].get(f"{svc.name}_restarts", 0))
        info: dict[str, Any] = {"pid": None, "restarts": restarts, "port": svc.port,
                                "log": str(self.home.root / "logs" / f"{svc.name}.log")}
        if proc is None:
            return {**info, "state": "stopped"}
        if proc.gave_up:
            return {**info, "state": "failed"}
        pid = proc.pid
        if pid is None:
            return {**info, "state": "restarting" if restarts else "starting"}
        born = self._born.get(svc.name)
        if born is None or born[0] != pid:
            born = self._born[svc.name] = (pid, time.monotonic(), False)
        up = born[2]
        if not up:  # probe until up once; afterwards the same pid stays up
            up = (_listening(svc.host, svc.port) if svc.port is not None
                  else time.monotonic() - born[1] >= SETTLE_S)
            self._born[svc.name] = (pid, born[1], up)
        return {**info, "pid": pid, "state": "up" if up else "starting"}

    def status(self) -> dict[str, Any]:
        """What ``status.json`` holds: the supervisor and each service's state."""
        return {"pid": os.getpid(), "home": str(self.home.root), "updated": time.time(),
                "services": {s.name: self._state(s) for s in self.services}}

    def _publish(self, final: bool = False) -> None:
        st = self.status()
        if final:
            st["stopped"] = True
            for v in st["services"].values():
                v.update(state="stopped", pid=None)
        _write_atomic(self.home.run_dir / "status.json", json.dumps(st, indent=2) + "\n")
        broker = self.procs.get("mosquitto")
        pid = None if broker is None or final else broker.pid
        if pid != self._mosquitto_pid:  # `devices enroll/revoke` SIGHUP it through this
            path = self.home.run_dir / "mosquitto.pid"
            if pid is None:
                path.unlink(missing_ok=True)
            else:
                _write_atomic(path, f"{pid}\n")
            self._mosquitto_pid = pid

    def _wait_broker(self, stop: threading.Event, timeout: float = 30.0) -> None:
        broker = next((s for s in self.services if s.name == "mosquitto"), None)
        if broker is None or broker.port is None:
            return
        end = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < end:
            if _listening(broker.host, broker.port):
                return
            self._publish()
            stop.wait(0.2)

    def run(self, stop: threading.Event, tick: float = 1.0) -> None:
        """Start every service (MQTT clients once the broker listens), publish the
        status every ``tick`` seconds until ``stop``, then stop them, newest first."""
        if any(s.name == "mosquitto" for s in self.services):
            write_mosquitto_conf(self.home)
        _write_atomic(self.home.run_dir / "server.pid", f"{os.getpid()}\n")
        try:
            for svc in self.services:
                if svc.needs_broker:
                    self._wait_broker(stop)
                if stop.is_set():
                    break
                self._start(svc)
            while not stop.is_set():
                self._publish()
                stop.wait(tick)
        finally:
            for name in reversed(list(self.procs)):
                self.procs[name].stop(10.0)
            self._publish(final=True)
            (self.home.run_dir / "server.pid").unlink(missing_ok=True)
