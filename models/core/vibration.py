"""The ``vibration`` task: machine faults from 3-axis accelerometer windows.

The data are generated here from a small physical model of a motor-driven shaft on two
rolling-element bearings, seen by an accelerometer on the bearing housing (x, y radial,
z axial); docs/tasks.md explains each term. The shaft speed differs from window to window
(1200-2400 rpm) and drifts within a window, fault severity ranges from barely above the
healthy baseline to severe, and every machine has some residual imbalance and noise, so
classes overlap near the mild end. Generation is deterministic in the seed.
Features are the device's own (:mod:`edgefleet.device.input.features`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgefleet.device.input.features import (
    MAX_FEATURE,
    MIN_FEATURE,
    N_FEATURES,
    SAMPLE_RATE_HZ,
    WINDOW,
    band_energies,
)
from edgefleet.models.core.tasks import Task, register_task

__all__ = ["CALIB_EXTRA_PER_CLASS", "CALIB_EXTRA_SEED", "LABELS", "SEED", "WINDOWS_PER_CLASS",
           "generate_windows", "simulate_window"]

LABELS = ("healthy", "imbalance", "misalignment", "bearing_defect", "looseness")
SEED = 20240901
WINDOWS_PER_CLASS = 700
#: Extra calibration windows per class, from their own seed (so disjoint from train and
#: test): the cascade's τ needs more than the 420-window calibration split to see a
#: cloud-vs-device difference of half a point (docs/bench/cascade.md).
CALIB_EXTRA_PER_CLASS = 700
CALIB_EXTRA_SEED = SEED + 1
F64 = npt.NDArray[np.float64]
_T = np.arange(WINDOW) / SAMPLE_RATE_HZ


def _shaft_phase(rng: np.random.Generator, speed: float = 1.0) -> tuple[F64, float]:
    """Shaft angle over the window (speed 20-40 Hz × ``speed``, drifting up to ±2 %), mean rate."""
    f0 = rng.uniform(20.0, 40.0) * speed
    drift = rng.uniform(-0.02, 0.02)
    rate = f0 * (1.0 + drift * _T / _T[-1])
    phase = 2 * np.pi * np.cumsum(rate) / SAMPLE_RATE_HZ + rng.uniform(0, 2 * np.pi)
    return phase, float(rate.mean())


def _impacts(rng: np.random.Generator, period_s: float, f_res: float, tau_s: float,
             jitter: float) -> F64:
    """A train of decaying resonance ringings, one per impact, with slip in the timing."""
    out = np.zeros(WINDOW)
    t_hit = rng.uniform(0, period_s)
    ring_len = min(WINDOW, int(8 * tau_s * SAMPLE_RATE_HZ))
    tr = np.arange(ring_len) / SAMPLE_RATE_HZ
    ring = np.exp(-tr / tau_s) * np.sin(2 * np.pi * f_res * tr)
    while t_hit < _T[-1]:
        i = int(t_hit * SAMPLE_RATE_HZ)
        k = min(ring_len, WINDOW - i)
        out[i:i + k] += ring[:k] * rng.uniform(0.6, 1.4)
        t_hit += period_s * (1 + rng.normal(0, jitter))
    return out


def simulate_window(label: int, rng: np.random.Generator, speed: float = 1.0) -> F64:
    """One ``(WINDOW, 3)`` window in g for class ``label`` (index into :data:`LABELS`).

    ``speed`` scales the shaft speed (1.0: the 20-40 Hz the task is trained on).
    """
    phase, fr = _shaft_phase(rng, speed)
    x = np.zeros((WINDOW, 3))
    # Every machine: residual imbalance (1x, radial, in quadrature), a little 2x.
    a1 = rng.lognormal(np.log(0.04), 0.35)
    aniso = rng.uniform(0.7, 1.3)
    x[:, 0] += a1 * np.cos(phase)
    x[:, 1] += a1 * aniso * np.sin(phase)
    x[:, :2] += (a1 * rng.uniform(0.05, 0.25)) * np.cos(2 * phase + rng.uniform(0, 6.3))[:, None]
    x[:, 2] += a1 * rng.uniform(0.05, 0.2) * np.cos(phase + rng.uniform(0, 6.3))
    sev = rng.uniform(0.08, 1.0)  # fault severity: mild faults sit close to healthy
    name = LABELS[label]
    if name == "imbalance":
        a = sev * rng.uniform(0.12, 0.45)
        x[:, 0] += a * np.cos(phase)
        x[:, 1] += a * aniso * np.sin(phase)
    elif name == "misalignment":
        a2 = sev * rng.uniform(0.06, 0.25)
        x[:, :2] += a2 * np.cos(2 * phase + rng.uniform(0, 6.3))[:, None] * [1.0, aniso]
        x[:, 2] += sev * rng.uniform(0.06, 0.25) * np.cos(phase + rng.uniform(0, 6.3))
        x[:, 2] += sev * rng.uniform(0.04, 0.2) * np.cos(2 * phase + rng.uniform(0, 6.3))
    elif name == "bearing_defect":
        n_balls = int(rng.integers(8, 13))
        d_ratio = rng.uniform(0.15, 0.3)
        inner = rng.random() < 0.5
        f_def = n_balls / 2 * fr * ((1 + d_ratio) if inner else (1 - d_ratio))
        hits = _impacts(rng, 1.0 / f_def, rng.uniform(1200, 2200), rng.uniform(0.6e-3, 2e-3),
                        jitter=0.015)
        if inner:  # the defect turns with the shaft: impacts are modulated at 1x
            hits *= 1 + 0.6 * np.cos(phase)
        amp = sev * rng.uniform(0.25, 0.9)
        x += amp * hits[:, None] * [1.0, rng.uniform(0.5, 1.0), rng.uniform(0.2, 0.5)]
    elif name == "looseness":
        a = sev * rng.uniform(0.1, 0.35)
        r = np.cos(phase)
        clipped = np.clip(r, -rng.uniform(0.3, 0.7), rng.uniform(0.2, 0.5))  # harmonics
        x[:, 0] += a * clipped
        x[:, 1] += a * aniso * np.clip(np.sin(phase), -0.5, 0.4)
        x[:, :2] += (sev * rng.uniform(0.02, 0.08)) * np.cos(0.5 * phase)[:, None]  # ½x
        rattle = _impacts(rng, 1.0 / fr, rng.uniform(300, 600), rng.uniform(2e-3, 5e-3),
                          jitter=0.05)
        x += (sev * rng.uniform(0.05, 0.2)) * rattle[:, None] * [1.0, 1.0, 0.5]
    # Sensor: gravity on z, white noise, a gain error per axis.
    x[:, 2] += 1.0
    x += rng.normal(0, rng.uniform(0.01, 0.05), size=x.shape)
    x *= rng.uniform(0.9, 1.1, size=3)
    return x


def generate_windows(per_class: int = WINDOWS_PER_CLASS, seed: int = SEED
                     ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``per_class`` windows of each class, ``(n, WINDOW, 3)`` float32, with labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(LABELS)), per_class)
    rng.shuffle(y)
    windows = np.stack([simulate_window(int(c), rng) for c in y]).astype(np.float32)
    return windows, y.astype(np.int64)


def _load() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    windows, y = generate_windows()
    return band_energies(windows), y


def _load_extra_calib() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    windows, y = generate_windows(CALIB_EXTRA_PER_CLASS, CALIB_EXTRA_SEED)
    return band_energies(windows), y


register_task(Task(
    name="vibration",
    labels=LABELS,
    n_features=N_FEATURES,
    loader=_load,
    min_value=MIN_FEATURE,
    max_value=MAX_FEATURE,
    default_hidden=(64, 32),
    extra_calib=_load_extra_calib,
))
