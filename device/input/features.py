"""Vibration features computed on the device: FFT band energies of a 3-axis window.

A sensor sends raw accelerometer windows (payload ``ACCEL_F32``, docs/serial-protocol.md)
and the device turns each into the 48 numbers the ``vibration`` model takes, in NumPy,
with exactly the code the training data went through (``edgefleet.models.core.vibration``
imports this module), so training and serving cannot drift apart.

Per axis: remove the mean (gravity, sensor offset), apply a Hann window, take the power
spectrum, and sum it over 16 log-spaced bands from 5 Hz to Nyquist (scaled so a band's
value is the signal power in g² it holds); the feature is ``log10(power + 1e-10)``. Log
spacing gives the shaft-rate region (20-40 Hz) the resolution it needs and still covers
the bearing resonances in the kHz range.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = [
    "AXES",
    "BAND_EDGES_HZ",
    "FEATURE_NAMES",
    "MAX_FEATURE",
    "MIN_FEATURE",
    "N_BANDS",
    "N_FEATURES",
    "SAMPLE_RATE_HZ",
    "WINDOW",
    "band_energies",
    "window_features",
]

SAMPLE_RATE_HZ = 5120
WINDOW = 1024
AXES = 3
N_BANDS = 16
BAND_EDGES_HZ = np.geomspace(5.0, SAMPLE_RATE_HZ / 2, N_BANDS + 1)
N_FEATURES = AXES * N_BANDS
FEATURE_NAMES = tuple(f"{axis}_{lo:.0f}_{hi:.0f}Hz" for axis in "xyz"
                      for lo, hi in zip(BAND_EDGES_HZ[:-1], BAND_EDGES_HZ[1:], strict=True))
#: The floor of the log (an all-zero band) and a power no accelerometer reaches (±200 g).
MIN_FEATURE = -10.0
MAX_FEATURE = 6.0
#: Largest |acceleration| in g we accept as a reading rather than a broken sensor.
MAX_ABS_G = 200.0

_HANN = np.hanning(WINDOW).astype(np.float64)
_FREQS = np.fft.rfftfreq(WINDOW, 1.0 / SAMPLE_RATE_HZ)
_BAND_OF_BIN = np.searchsorted(BAND_EDGES_HZ, _FREQS, side="right") - 1
_IN_BAND = (_BAND_OF_BIN >= 0) & (_BAND_OF_BIN < N_BANDS)
#: One-sided spectrum → power (Parseval with the window's energy).
_SCALE = 2.0 / (WINDOW * float(np.sum(_HANN ** 2)))
_BANDS = np.zeros((len(_FREQS), N_BANDS))
_BANDS[np.flatnonzero(_IN_BAND), _BAND_OF_BIN[_IN_BAND]] = 1.0


def band_energies(windows: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Features of windows ``(n, WINDOW, 3)`` (or one ``(WINDOW, 3)``), no validation."""
    x = np.asarray(windows, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    x = x - x.mean(axis=1, keepdims=True)
    spec = np.fft.rfft(x * _HANN[None, :, None], axis=1)
    power = (spec.real ** 2 + spec.imag ** 2) * _SCALE  # (n, bins, 3)
    bands = np.einsum("nfa,fb->nab", power, _BANDS)  # (n, 3, N_BANDS)
    feats: npt.NDArray[np.float32] = (np.log10(bands + 1e-10).reshape(len(x), N_FEATURES)
                                      .astype(np.float32))
    return feats[0] if single else feats


def window_features(window: npt.ArrayLike, metrics: Metrics | None = None
                    ) -> npt.NDArray[np.float32]:
    """Validate one raw window ``(WINDOW, 3)`` in g and return its ``N_FEATURES`` features.

    A window of the wrong shape, with NaN/inf, or beyond ±200 g raises
    :class:`InputError` (counted as ``inputs_invalid_<reason>``).
    """
    m = metrics if metrics is not None else default_metrics()
    try:
        x = np.asarray(window, dtype=np.float64)
    except (TypeError, ValueError):
        m.inc("inputs_invalid_dtype")
        raise InputError("window is not an array of numbers", reason="dtype") from None
    if x.shape != (WINDOW, AXES):
        if x.size == WINDOW * AXES and x.ndim == 1:
            x = x.reshape(WINDOW, AXES)
        else:
            m.inc("inputs_invalid_shape")
            raise InputError(f"window shape {x.shape} (want ({WINDOW}, {AXES}))",
                             reason="shape")
    if not np.all(np.isfinite(x)):
        m.inc("inputs_invalid_nonfinite")
        raise InputError("window has NaN/inf samples", reason="nonfinite")
    if np.max(np.abs(x)) > MAX_ABS_G:
        m.inc("inputs_invalid_range")
        raise InputError(f"window has samples beyond ±{MAX_ABS_G:g} g", reason="range")
    return band_energies(x)
