"""Retry with exponential backoff and full jitter: the one backoff object edgefleet uses.

MQTT reconnects, Flower reconnects, update downloads and the serial reader all back off
with this, so a broker restart does not bring a thousand devices back in the same
100 ms (paho's own reconnect delay has no jitter).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Backoff", "retry_call"]

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays ``uniform(0, min(cap, base * 2**attempt))`` (AWS "full jitter")."""

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until :meth:`reset`."""
        delay = self.rng.uniform(0.0, min(self.cap, self.base * (2.0 ** self.attempt)))
        self.attempt = min(self.attempt + 1, 62)
        return delay

    def reset(self) -> None:
        """Call after a success so the next failure starts small again."""
        self.attempt = 0

    def delays(self) -> Iterator[float]:
        """An endless stream of delays."""
        while True:
            yield self.next_delay()


def retry_call(
    fn: Callable[[], T],
    *,
    retry_on: tuple[type[BaseException], ...],
    attempts: int = 5,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
) -> T:
    """Call ``fn`` until it succeeds: at most ``attempts`` times, and not past ``deadline``."""
    bo = backoff or Backoff()
    for i in range(attempts):
        try:
            return fn()
        except retry_on:
            if i == attempts - 1:
                raise
            delay = bo.next_delay()
            if deadline is not None and time.monotonic() + delay > deadline:
                raise
            sleep(delay)
    raise AssertionError("unreachable")
