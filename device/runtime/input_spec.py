"""Raw inputs (serial frames, local API lists and images, ``.npy`` rows) → the model's samples.

One module turns every input path's array into a batch ``(n, *input.shape)`` of **raw**
values, checked against the manifest's input spec: the element count, a window's length
and channel count (``NWC``), an image's channels and size, the dtype and finiteness. It
applies no preprocessing: the declared ``scale``/``mean``/``std`` reach the model once,
through the manifest's per-feature ``normalization`` that :class:`~edgefleet.device.runtime.
predictor.Predictor` applies (the importer derived one from the other), so a path that
normalized here too would normalize twice.

A mismatch raises :class:`InputError` whose message names the expected spec and whose
``reason`` is one of :data:`REASONS`, counted as ``input_rejected_<reason>``; it never
reaches the runtime.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.runtime.manifest import InputSpec

__all__ = ["MAX_BATCH", "REASONS", "InputAdapter", "describe"]

F32 = npt.NDArray[np.float32]
#: Largest batch one call accepts (as the Predictor's): bounds what one request can claim.
MAX_BATCH = 4096
#: Why an input was refused: stable names, each counted as ``input_rejected_<reason>``.
REASONS = ("count", "window", "channels", "size", "dtype", "nonfinite", "batch")


def describe(spec: InputSpec) -> str:
    """The expected input in words, e.g. ``float32 [32, 3] (NWC: 32 samples x 3 channels)``."""
    shape = spec.shape
    text = f"{spec.dtype} {list(shape)}"
    if spec.layout == "NWC" and len(shape) == 2:
        return f"{text} (NWC: {shape[0]} samples x {shape[1]} channels)"
    if spec.layout == "NHWC" and len(shape) == 3:
        return f"{text} (NHWC: {shape[0]}x{shape[1]} image, {shape[2]} channel(s))"
    if spec.layout == "NCHW" and len(shape) == 3:
        return f"{text} (NCHW: {shape[0]} channel(s), {shape[1]}x{shape[2]} image)"
    return f"{text} ({math.prod(shape)} values)"


class InputAdapter:
    """Checks and shapes raw inputs for one model's :class:`InputSpec`.

    Accepted, for a sample shape ``T`` with ``n = prod(T)`` values: one sample ``T``, a
    flat row ``(n,)`` (how serial vectors and the built-in tasks send it), ``T`` without
    its size-1 channel (a grayscale ``(H, W)`` for ``(H, W, 1)``), and a batch of any of
    these. Other arrays with ``n`` values (a transposed image) are refused, not reshaped.
    """

    def __init__(self, spec: InputSpec, metrics: Metrics | None = None) -> None:
        self.spec = spec
        self.metrics = metrics if metrics is not None else default_metrics()
        self.shape = tuple(spec.shape)
        self.size = math.prod(self.shape)
        self._forms = {self.shape, (self.size,), tuple(d for d in self.shape if d != 1) or (1,)}
        self._channel_axis: int | None = None
        if spec.layout in ("NWC", "NHWC"):
            self._channel_axis = len(self.shape) - 1
        elif spec.layout == "NCHW":
            self._channel_axis = 0
        self.expected = describe(spec)

    def _reject(self, reason: str, message: str) -> InputError:
        self.metrics.inc(f"input_rejected_{reason}")
        return InputError(f"{message}; expected {self.expected}", reason=reason)

    def batch(self, x: Any) -> F32:
        """``x`` as a float32 batch ``(n, *shape)`` of raw values (no preprocessing)."""
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError):
            raise self._reject("count", "input is not a rectangular array") from None
        if arr.dtype.kind not in "fiu":
            raise self._reject("dtype", f"input dtype {arr.dtype} is not a real number type")
        shape = arr.shape
        if shape in self._forms:
            n = 1
        elif len(shape) >= 1 and shape[1:] in self._forms:
            n = shape[0]
            if not 0 < n <= MAX_BATCH:
                raise self._reject("batch", f"batch of {n} samples (allowed: 1..{MAX_BATCH})")
        else:
            raise self._mismatch(shape)
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(np.float32, copy=False).reshape(n, *self.shape)
        if not np.isfinite(out).all():
            bad = ~np.isfinite(out)
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise self._reject("nonfinite", f"input has {int(bad.sum())} NaN/inf value(s) "
                               f"(or values beyond float32), first at {idx}")
        return out

    def _mismatch(self, shape: tuple[int, ...]) -> InputError:
        """Say what is wrong with an input of ``shape``: channels, window length, size."""
        rank = len(self.shape)
        ax = self._channel_axis
        if ax is not None and len(shape) in (rank, rank + 1):
            got = shape[len(shape) - rank:]
            want_c, got_c = self.shape[ax], got[ax]
            if got_c != want_c:
                return self._reject("channels", f"input of shape {list(shape)} has {got_c} "
                                    f"channel(s), not {want_c}")
            if self.spec.layout == "NWC":
                return self._reject("window", f"window of {got[0]} samples, not "
                                    f"{self.shape[0]}")
            return self._reject("size", f"image of shape {list(got)}, not {list(self.shape)}")
        count = math.prod(shape)
        return self._reject("count", f"input of shape {list(shape)} ({count} values) is "
                            f"neither one sample nor a batch of them")
