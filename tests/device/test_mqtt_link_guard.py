"""MqttLink callbacks and network threads that cannot die (issue 15)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.core.mqtt_link import LinkThread, MqttConfig, MqttLink


def _link(m: Metrics) -> MqttLink:
    return MqttLink(MqttConfig(port=1, backoff_base=0.01, backoff_cap=0.02), "t",
                    prefix="t", metrics=m)


@pytest.mark.parametrize("exc", [ValueError("x"), RecursionError("deep"), MemoryError()])
def test_a_failing_callback_is_counted_not_raised(exc: BaseException) -> None:
    m = Metrics()

    def cb(*_a: Any) -> None:
        raise exc

    _link(m)._guard("message", cb)(None, None, None)
    assert m.counter("t_callback_errors") == 1


def test_interpreter_exits_are_not_swallowed() -> None:
    def cb(*_a: Any) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _link(Metrics())._guard("message", cb)(None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_link_thread_restarts_a_dead_network_thread() -> None:
    m = Metrics()
    link = _link(m)
    calls = {"n": 0}
    real = link.step

    def step(timeout: float = 0.05) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise SystemExit  # what nothing else catches
        real(timeout)

    link.step = step  # type: ignore[method-assign]
    net = LinkThread(link, "t-net").start()
    try:
        end = time.monotonic() + 5
        while net.alive and time.monotonic() < end:
            time.sleep(0.01)
        assert not net.alive
        assert net.ensure() and net.alive and m.counter("t_thread_restarts") == 1
        end = time.monotonic() + 10
        while m.counter("t_connect_errors") < 1 and time.monotonic() < end:
            time.sleep(0.02)
        assert m.counter("t_connect_errors") >= 1  # the new thread keeps trying (port 1)
        assert net.alive and calls["n"] > 1 and not net.ensure()
    finally:
        net.join()
    assert not net.alive and not net.ensure()  # stopped on purpose: not restarted


def test_safe_step_counts_and_keeps_going() -> None:
    m = Metrics()
    link = _link(m)

    def boom(timeout: float = 0.05) -> None:
        raise OSError("socket gone")

    link.step = boom  # type: ignore[method-assign]
    link.safe_step()
    assert m.counter("t_loop_errors") == 1
