"""Device-side vibration features: physics (Parseval), validation, batch = single."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.device.core.errors import InputError
from edgefleet.device.core.metrics import Metrics
from edgefleet.device.input.features import (
    BAND_EDGES_HZ,
    N_BANDS,
    N_FEATURES,
    SAMPLE_RATE_HZ,
    WINDOW,
    band_energies,
    window_features,
)

T = np.arange(WINDOW) / SAMPLE_RATE_HZ


@pytest.mark.parametrize("freq", [25.0, 160.0, 1500.0])
def test_sine_power_lands_in_its_band(freq: float) -> None:
    amp = 0.5
    w = np.zeros((WINDOW, 3))
    w[:, 1] = amp * np.sin(2 * np.pi * freq * T) + 3.0  # DC offset is removed
    f = window_features(w).reshape(3, N_BANDS)
    band = int(np.searchsorted(BAND_EDGES_HZ, freq, side="right") - 1)
    power = 10.0 ** f[1]
    # Most of the sine's power amp²/2 is in its band (Hann leakage goes to neighbours).
    assert power[band] == pytest.approx(amp**2 / 2, rel=0.3)
    assert power.sum() == pytest.approx(amp**2 / 2, rel=0.05)
    assert f[0].max() < -9 and f[2].max() < -9  # silent axes sit at the floor


def test_batch_equals_single() -> None:
    rng = np.random.default_rng(0)
    ws = rng.normal(0, 0.1, size=(5, WINDOW, 3))
    batch = band_energies(ws)
    assert batch.shape == (5, N_FEATURES)
    np.testing.assert_allclose(batch[3], band_energies(ws[3]), rtol=1e-6)
    np.testing.assert_allclose(window_features(ws[3].reshape(-1)), batch[3], rtol=1e-6)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (np.zeros((WINDOW, 2)), "shape"),
        (np.zeros((10, 3)), "shape"),
        (np.full((WINDOW, 3), np.nan), "nonfinite"),
        (np.full((WINDOW, 3), 500.0), "range"),
        ([["a"] * 3] * WINDOW, "dtype"),
    ],
)
def test_bad_window_is_typed_and_counted(bad: object, reason: str) -> None:
    m = Metrics()
    with pytest.raises(InputError) as exc:
        window_features(bad, metrics=m)
    assert exc.value.reason == reason
    assert m.counter(f"inputs_invalid_{reason}") == 1
