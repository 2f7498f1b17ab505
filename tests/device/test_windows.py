"""The window assembler: per-sensor windows of N samples x C channels every ``hop``."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.input.windows import MAX_SENSORS, WindowAssembler


def _stream(n: int, c: int = 2) -> np.ndarray:
    return np.arange(n * c, dtype=np.float32).reshape(n, c)


@pytest.mark.parametrize(("hop", "per_frame"), [(4, 1), (4, 3), (1, 5), (2, 10)])
def test_windows_every_hop_whatever_the_frame_size(hop: int, per_frame: int) -> None:
    s = _stream(40)
    wa = WindowAssembler(4, 2, hop, metrics=Metrics())
    got = []
    for seq, i in enumerate(range(0, len(s), per_frame)):
        got += wa.feed(7, seq, s[i:i + per_frame].reshape(-1))
    want = [s[e - 4:e] for e in range(4, len(s) + 1, hop)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_sensors_are_kept_apart_and_gaps_reset() -> None:
    m = Metrics()
    wa = WindowAssembler(3, 1, metrics=m)
    assert wa.feed(1, 0, [1, 2]) == [] and wa.feed(2, 0, [10, 20]) == []
    [w1] = wa.feed(1, 1, [3])
    [w2] = wa.feed(2, 1, [30])
    assert w1.ravel().tolist() == [1, 2, 3] and w2.ravel().tolist() == [10, 20, 30]
    assert wa.feed(1, 2, [4, 5]) == []
    assert wa.feed(1, 4, [6]) == []  # seq 3 lost: 4, 5 are dropped, not glued to 6
    assert m.counter("input_window_resets") == 1
    [w] = wa.feed(1, 5, [7, 8])
    assert w.ravel().tolist() == [6, 7, 8]


def test_partial_samples_are_refused_and_reset() -> None:
    m = Metrics()
    wa = WindowAssembler(2, 3, metrics=m)
    assert wa.feed(1, None, np.zeros(3)) == []
    assert wa.feed(1, None, np.zeros(4)) == [] and wa.feed(1, None, []) == []
    assert m.counter("input_rejected_channels") == 2
    assert m.counter("input_window_resets") == 1


def test_memory_is_bounded_by_window_and_sensors() -> None:
    wa = WindowAssembler(8, 2, 8, metrics=Metrics())
    for sensor in range(MAX_SENSORS * 2):
        wa.feed(sensor, 0, np.zeros(6))
    assert len(wa._tracks) <= MAX_SENSORS
    wa.feed(0, 1, np.zeros(2 * 1000))
    assert all(len(t.buf) <= 8 for t in wa._tracks.values())


@pytest.mark.parametrize(("n", "c", "hop"), [(0, 1, None), (4, 0, None), (4, 1, 5), (4, 1, 0)])
def test_bad_settings(n: int, c: int, hop: int | None) -> None:
    with pytest.raises(UsageError):
        WindowAssembler(n, c, hop)
