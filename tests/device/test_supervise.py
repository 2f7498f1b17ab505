"""A supervised child process is restarted when it dies and given up on when it crash-loops."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.process import SupervisedProcess
from edgefleet.device.core.retry import Backoff


def _wait(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def test_restarts_a_killed_child_and_stops_cleanly() -> None:
    m = Metrics()
    sp = SupervisedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
                           backoff=Backoff(base=0.05, cap=0.1), metrics=m).start()
    try:
        assert _wait(lambda: sp.pid is not None)
        first = sp.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: sp.pid not in (None, first))
        assert m.counter("sleeper_restarts") == 1
    finally:
        sp.stop()
    assert sp.pid is None


@pytest.mark.timeout(60)
def test_gives_up_on_a_crash_loop() -> None:
    m = Metrics()
    sp = SupervisedProcess("crasher", [sys.executable, "-c", "raise SystemExit(3)"],
                           backoff=Backoff(base=0.01, cap=0.02), max_restarts=3, metrics=m).start()
    assert _wait(lambda: sp.gave_up, 30)
    assert m.counter("crasher_restarts") == 4
    sp.stop()
