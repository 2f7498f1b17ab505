"""What the agent feeds the active model: serial frames and API inputs, shaped by its spec.

A built-in task's package (no ``input.layout``) keeps the original frame contract: a
vector frame is one feature row, an ``ACCEL_F32`` window becomes the vibration features.
An imported model's package says how its input looks (docs/bring-your-own-model.md):

* ``NWC`` (windows of N samples x C channels): every vector or accelerometer frame
  carries ``k x C`` values, ``k`` whole samples; a per-sensor
  :class:`~edgefleet.device.input.windows.WindowAssembler` turns them into windows every
  ``hop`` samples (``[input] hop``; default N, back-to-back windows).
* ``flat``, ``NHWC``, ``NCHW``: a vector frame is one whole sample, flat, in the model's
  layout (e.g. 64 ``U8_VECTOR`` bytes for an 8x8x1 image).

Either way the result goes through :class:`~edgefleet.device.runtime.input_spec.
InputAdapter` (one checker for every path) and reaches the model as raw values; the
Predictor applies the declared preprocessing once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.input.features import window_features
from edgefleet.device.input.windows import WindowAssembler
from edgefleet.device.runtime.input_spec import InputAdapter
from edgefleet.device.runtime.manifest import Manifest
from edgefleet.device.wire.frames import Frame, PayloadType

__all__ = ["ModelInput"]

F32 = npt.NDArray[np.float32]


class ModelInput:
    """Turns frames and request arrays into samples for one manifest's model."""

    def __init__(self, manifest: Manifest, *, hop: int | None = None,
                 metrics: Metrics | None = None) -> None:
        self.manifest = manifest
        self.metrics = metrics if metrics is not None else default_metrics()
        self.spec = manifest.input
        self.builtin = self.spec.layout is None
        self.adapter = InputAdapter(self.spec, self.metrics)
        self.windows: WindowAssembler | None = None
        if self.spec.layout == "NWC" and len(self.spec.shape) == 2:
            n, c = self.spec.shape
            self.windows = WindowAssembler(n, c, min(hop, n) if hop else None,
                                           metrics=self.metrics)

    def request(self, x: Any) -> F32:
        """A local API or CLI input (one sample or a batch) as ``(n, *shape)``."""
        return self.adapter.batch(x)

    def frame(self, frame: Frame, raw: F32 | None = None) -> list[F32]:
        """The samples one sensor frame completes: zero or more, each of the input shape
        (``raw``: the frame's :meth:`~Frame.values`, when the caller decoded them already).

        Raises :class:`~edgefleet.device.core.errors.InputError` (counted) on a mismatch.
        """
        raw = frame.values() if raw is None else raw
        if self.builtin:
            if frame.payload_type == PayloadType.ACCEL_F32:
                return [window_features(raw, self.metrics)]
            return [raw]
        if self.windows is not None:
            done = self.windows.feed(frame.sensor_id, frame.seq, raw)
            return [self.adapter.batch(w)[0] for w in done]
        return [self.adapter.batch(raw.reshape(-1))[0]]
