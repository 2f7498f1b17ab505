"""Windows of N samples x C channels from a sensor that streams a few samples per frame.

A model whose input spec has layout ``NWC`` takes windows (docs/bring-your-own-model.md);
a streaming sensor sends C channel values per sample, one or a few samples per frame
(docs/serial-protocol.md). :class:`WindowAssembler` keeps, per sensor, the last samples
and hands out a window each time ``hop`` new samples completed one (``hop = N``:
back-to-back windows; smaller: overlapping ones). Memory is bounded by ``N`` samples per
sensor and a bounded number of sensors.

A lost frame (a gap in the sensor's sequence numbers) or a sensor restart breaks the
time series: the partial window is dropped rather than glued across the gap
(``input_window_resets``). A frame that is not whole samples of C channels is refused
(``input_rejected_channels``) and also resets that sensor's window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = ["MAX_SENSORS", "WindowAssembler"]

F32 = npt.NDArray[np.float32]
#: Sensors tracked at once; forged sensor ids beyond this start everyone afresh.
MAX_SENSORS = 256
SEQ_MOD = 1 << 32


@dataclass
class _Track:
    buf: F32  # the last samples, at most one window
    filled: int = 0  # samples in buf
    need: int = 0  # samples still to come before the next window
    last_seq: int | None = None


class WindowAssembler:
    """Per-sensor sliding windows of ``window`` samples x ``channels``, every ``hop``."""

    def __init__(self, window: int, channels: int, hop: int | None = None, *,
                 metrics: Metrics | None = None) -> None:
        hop = window if hop is None else hop
        if window < 1 or channels < 1 or not 1 <= hop <= window:
            raise UsageError(f"window {window} x {channels} with hop {hop}: need window, "
                             "channels >= 1 and 1 <= hop <= window")
        self.window, self.channels, self.hop = window, channels, hop
        self.metrics = metrics if metrics is not None else default_metrics()
        self._tracks: dict[int, _Track] = {}

    def _track(self, sensor: int) -> _Track:
        t = self._tracks.get(sensor)
        if t is None:
            if len(self._tracks) >= MAX_SENSORS:
                self._tracks.clear()
            t = self._tracks[sensor] = _Track(
                np.zeros((0, self.channels), dtype=np.float32), need=self.window)
        return t

    def _reset(self, t: _Track) -> None:
        if t.filled:
            self.metrics.inc("input_window_resets")
        t.filled, t.need = 0, self.window

    def feed(self, sensor: int, seq: int | None, values: npt.ArrayLike) -> list[F32]:
        """Add one frame's samples (``k x channels`` values, flat or ``(k, channels)``);
        return the windows ``(window, channels)`` it completed, oldest first."""
        t = self._track(sensor)
        if seq is not None:
            if t.last_seq is not None and seq != (t.last_seq + 1) % SEQ_MOD:
                self._reset(t)
            t.last_seq = seq % SEQ_MOD
        v = np.asarray(values, dtype=np.float32).reshape(-1)
        if v.size == 0 or v.size % self.channels:
            self._reset(t)
            self.metrics.inc("input_rejected_channels")
            return []
        pending = np.concatenate([t.buf[:t.filled], v.reshape(-1, self.channels)])
        n = len(pending)
        out: list[F32] = []
        end = t.filled + t.need
        while end <= n:
            out.append(pending[end - self.window:end].copy())
            end += self.hop
        t.need = end - n
        t.buf = pending[-self.window:]
        t.filled = len(t.buf)
        return out
