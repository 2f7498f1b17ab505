"""The fleet view's per-device event index says exactly what scanning the ring said.

A guard check used to scan one bounded ring of events for each device; :class:`EventLog`
keeps that ring and an index by device. Over random event streams (few devices, many
events, small bounds so eviction happens often) the index returns, for every device, the
same events in the same order as the old scan of a ``deque(maxlen=...)``, and the
rollback question the health check asks gets the same answer.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.server.rollout.event_log import EventLog
from edgefleet.server.rollout.records import json_number

DEVICES = ["pi-1", "pi-2", "pi-3", "pi-4"]
_EVENT = st.fixed_dictionaries({
    "device": st.sampled_from(DEVICES),
    "event": st.sampled_from(["installed", "rolled_back", "rejected", "trial_passed"]),
    "ts": st.one_of(st.floats(0, 100, allow_nan=False), st.text(max_size=3), st.none()),
})


def _bad(events: Any, device: str | None, since: float) -> bool:
    """The rollback/refusal question of ``FleetView.health`` (``device`` None: pre-filtered)."""
    return any((device is None or e.get("device") == device)
               and e.get("event") in ("rolled_back", "rejected")
               and json_number(e.get("ts")) >= since for e in events)


@settings(max_examples=300, deadline=None)
@given(maxlen=st.integers(1, 12), stream=st.lists(_EVENT, max_size=80),
       since=st.floats(0, 100, allow_nan=False))
def test_the_index_returns_what_the_scan_did(maxlen: int, stream: list[dict[str, Any]],
                                             since: float) -> None:
    ring: deque[dict[str, Any]] = deque(maxlen=maxlen)  # what FleetView kept before
    log = EventLog(maxlen)
    for i, e in enumerate(stream):
        ring.append(e)
        log.append(e)
        if i % 7 == 0 or i == len(stream) - 1:  # ask in the middle of the stream too
            assert list(log) == list(ring)
            assert len(log) == len(ring)
            for d in [*DEVICES, "pi-unknown"]:
                scanned = [x for x in ring if x.get("device") == d]
                assert list(log.of(d)) == scanned
                assert all(a is b for a, b in zip(log.of(d), scanned, strict=True))
                assert _bad(log.of(d), None, since) == _bad(ring, d, since)
            # The index holds no device the ring no longer has (memory stays bounded).
            assert log.devices() == len({x["device"] for x in ring})


def test_eviction_takes_the_oldest_event_of_any_device() -> None:
    log = EventLog(3)
    for i, d in enumerate(["pi-1", "pi-2", "pi-1", "pi-2"]):
        log.append({"device": d, "n": i})
    assert [e["n"] for e in log] == [1, 2, 3]
    assert [e["n"] for e in log.of("pi-1")] == [2]
    assert [e["n"] for e in log.of("pi-2")] == [1, 3]
    assert log[0]["n"] == 1 and log[-1]["n"] == 3


def test_an_event_changed_after_it_was_kept_is_still_evicted_from_its_list() -> None:
    log = EventLog(1)
    first = {"device": "pi-1"}
    log.append(first)
    first["device"] = "pi-9"  # the index keys by the device at arrival
    log.append({"device": "pi-2"})
    assert log.of("pi-1") == () and log.of("pi-9") == ()
    assert log.devices() == 1


def test_a_log_keeps_at_least_one_event() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EventLog(0)


def test_clear_forgets_the_ring_and_the_index() -> None:
    log = EventLog(3)
    for d in ("a", "b", "a"):
        log.append({"device": d})
    log.clear()
    assert len(log) == 0 and log.devices() == 0 and log.of("a") == ()
    log.append({"device": "b"})
    assert [e["device"] for e in log] == ["b"] and len(log.of("b")) == 1
