"""The fleet view's recent device events, bounded in total and indexed by device.

A guard check asks, for each canary device, whether it reported a rollback or a refusal:
scanning one global buffer for that made a check cost devices × events (515 ms for 1,000
devices with 10,000 events kept, docs/bench/fleet-size.md). :class:`EventLog` keeps the
same global ring (the memory bound: the oldest event goes first, whichever device sent
it) and, beside it, each device's events in arrival order, so a device's events cost only
their own number to read. Both hold the same objects: an event evicted from the ring
leaves its device's list too, so the index never says more than the ring.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

__all__ = ["EventLog"]


class EventLog:
    """A bounded ring of events (JSON objects with a ``device``) with a per-device index.

    Not thread-safe by itself: the fleet view calls it under its lock.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("an event log keeps at least one event")
        self.maxlen = maxlen
        #: (device key at arrival, event): the key is kept so eviction finds its list even
        #: if someone changed the event since.
        self._ring: deque[tuple[Any, dict[str, Any]]] = deque()
        self._by_device: dict[Any, deque[dict[str, Any]]] = {}

    def append(self, event: dict[str, Any]) -> None:
        """Keep ``event``; past ``maxlen`` the oldest event (of any device) goes."""
        if len(self._ring) >= self.maxlen:
            key, _old = self._ring.popleft()
            mine = self._by_device[key]
            # Per device the order is the ring's, so the ring's oldest is its device's.
            mine.popleft()
            if not mine:
                del self._by_device[key]
        key = event.get("device")
        self._ring.append((key, event))
        self._by_device.setdefault(key, deque()).append(event)

    def clear(self) -> None:
        """Forget every event (a watcher starting a new observation)."""
        self._ring.clear()
        self._by_device.clear()

    def of(self, device: str) -> tuple[dict[str, Any], ...]:
        """The kept events whose ``device`` is ``device``, oldest first."""
        return tuple(self._by_device.get(device, ()))

    def devices(self) -> int:
        """How many devices have events kept (the index's size)."""
        return len(self._by_device)

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (e for _, e in self._ring)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._ring[i][1]
