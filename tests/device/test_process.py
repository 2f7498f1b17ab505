"""The one child-process manager: real children, their logs, stopping them for sure."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.device.core.process import Child, ChildExited, ProcessGroup, wait_port
from tests.support.telemetry import wait_until

# Prints, ignores SIGTERM, says it is ready, then sleeps.
STUBBORN = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")


def _wait(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    return wait_until(pred, timeout, every=0.02)


def _gone(pid: int) -> bool:
    """Not running and not a zombie: reaped (or never ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(60)
def test_start_logs_output_and_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    child = Child.start("stubborn", [sys.executable, "-c", STUBBORN], log_path=log,
                        env={"EXTRA": "1"})
    assert child.alive() and child.pid > 0
    assert _wait(lambda: "ready" in child.tail())
    assert os.getpgid(child.pid) == child.pid  # its own process group
    t0 = time.monotonic()
    rc = child.stop(timeout=0.5)
    assert rc == -signal.SIGKILL  # SIGTERM was ignored: escalated
    assert time.monotonic() - t0 < 10
    assert not child.alive() and child.returncode == -signal.SIGKILL
    assert _gone(child.pid)  # reaped: no zombie left behind
    assert child.tail() == "ready"


@pytest.mark.timeout(60)
def test_stop_signals_the_whole_process_group(tmp_path: Path) -> None:
    # The child starts a grandchild (as a SuperNode starts its ClientApp) and exits on
    # SIGTERM; the grandchild must be signalled too.
    pidfile = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(600)\n")
    child = Child.start("parent", [sys.executable, "-c", code], log_path=tmp_path / "p.log")
    assert _wait(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    grandchild = int(pidfile.read_text())
    assert child.stop(timeout=5) == -signal.SIGTERM
    # The grandchild is not ours to reap (init adopts it); it must just be gone.
    assert _wait(lambda: _gone(grandchild) or _zombie(grandchild), 10)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_group_stops_in_parallel_and_reports_exit_codes(tmp_path: Path) -> None:
    group = ProcessGroup(tmp_path / "logs")
    group.start("a", [sys.executable, "-c", "import time; time.sleep(600)"])
    group.start("b", [sys.executable, "-c", STUBBORN])
    with pytest.raises(RuntimeError):
        group.start("a", [sys.executable, "-c", "pass"])
    assert group.alive("a") and group.alive("b")
    assert _wait(lambda: group.tail("b") == "ready")
    t0 = time.monotonic()
    codes = group.stop_many(["a", "b", "missing"], timeout=1.0)
    assert codes == {"a": -signal.SIGTERM, "b": -signal.SIGKILL}
    assert time.monotonic() - t0 < 5  # one timeout for all, not one each
    assert not group.alive("a") and not group.alive("b")
    assert (tmp_path / "logs" / "b.log").read_text().strip() == "ready"
    group.stop_all(1.0)  # stopping stopped children is harmless


def test_wait_port_sees_a_listener_and_an_early_exit(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = Child.start("listener", [sys.executable, "-c",
                                      "import socket, time\n"
                                      f"s = socket.create_server(('127.0.0.1', {port}))\n"
                                      "time.sleep(600)\n"])
    try:
        assert wait_port(server, port, timeout=30)
    finally:
        server.stop(5)
    failing = Child.start("failing", [sys.executable, "-c", "raise SystemExit(4)"])
    with pytest.raises(ChildExited, match="code 4"):
        wait_port(failing, port, timeout=30)
    sleeper = Child.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert not wait_port(sleeper, port, timeout=0.3)  # nobody listens: False in time
    finally:
        sleeper.stop(5)
