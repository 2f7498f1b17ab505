"""Distribution shifts of the simulated sensors (models/sim/shift.py, simulator `--shift`)."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.input.features import band_energies
from edgefleet.device.wire.frames import PayloadType
from edgefleet.models.core.vibration import simulate_window
from edgefleet.models.sim.sensor_sim import samples
from edgefleet.models.sim.shift import Shift, shifted_dataset, shifted_pixels


def test_parse_keys_per_task() -> None:
    assert Shift.parse("speed=1.6", "vibration") == Shift(speed=1.6)
    assert Shift.parse("intensity=0.5, noise=2", "digits") == Shift(intensity=0.5, noise=2.0)
    assert Shift.parse("", "digits").identity
    assert Shift(speed=1.6).describe() == "speed=1.6"
    for bad, task in (("speed=1.6", "digits"), ("noise=x", "digits"), ("speed", "vibration"),
                      ("gain=0", "vibration"), ("noise=-1", "digits"), ("speed=2", "vision"),
                      ("noise=nan", "digits"), ("intensity=inf", "digits"),
                      ("rotation=181", "digits"), ("rotation=nan", "digits"),
                      ("thickness=1.5", "digits"), ("rotation=10", "vibration")):
        with pytest.raises(UsageError):
            Shift.parse(bad, task)


def test_speed_moves_the_fault_spectrum() -> None:
    """The same seeded bearing-defect window at 1.6× speed puts its energy in other bands."""
    base = band_energies(simulate_window(3, np.random.default_rng(5)).astype(np.float32))
    fast = band_energies(simulate_window(3, np.random.default_rng(5), speed=1.6)
                         .astype(np.float32))
    same = band_energies(simulate_window(3, np.random.default_rng(5)).astype(np.float32))
    assert np.array_equal(base, same)
    assert np.abs(fast - base).max() > 0.5


def test_digits_shift_scales_and_clips() -> None:
    rng = np.random.default_rng(0)
    px = np.full(64, 16.0, dtype=np.float32)
    assert np.allclose(shifted_pixels(px, Shift(intensity=0.5), rng), 8.0)
    noisy = shifted_pixels(np.zeros(64, np.float32), Shift(noise=3.0), rng)
    assert noisy.min() >= 0 and noisy.max() <= 16 and noisy.max() > 0


def test_digits_rotation_and_stroke_thickness() -> None:
    """A camera turned 90° sees the image rotated; thicker strokes carry more ink, thinner
    less; flat rows and (n, 8, 8, 1) images are shifted the same way."""
    from sklearn.datasets import load_digits

    img = load_digits().images[:3].astype(np.float32)
    rng = np.random.default_rng(0)
    turned = shifted_pixels(img.reshape(3, 64), Shift(rotation=90), rng).reshape(3, 8, 8)
    assert np.allclose(turned, np.rot90(img, axes=(1, 2)), atol=1e-4)
    assert not np.allclose(turned, np.rot90(img, -1, axes=(1, 2)), atol=1e-4)
    thick = shifted_pixels(img[..., None], Shift(thickness=0.5), rng)
    thin = shifted_pixels(img[..., None], Shift(thickness=-0.5), rng)
    assert thick.shape == (3, 8, 8, 1)
    assert thin.sum() < img.sum() < thick.sum()
    assert np.array_equal(shifted_pixels(img.reshape(3, 64), Shift(thickness=0.5), rng),
                          thick.reshape(3, 64))
    assert Shift.parse("rotation=-15,thickness=0.5", "digits").describe() == \
        "rotation=-15,thickness=0.5"


def test_simulator_stream_uses_the_shift() -> None:
    plain = next(samples("digits", 3))
    dim = next(samples("digits", 3, shift=Shift(intensity=0.5)))
    assert plain[0] == dim[0] == PayloadType.U8_VECTOR and plain[2] == dim[2]
    a = np.frombuffer(plain[1], np.uint8).astype(float)
    b = np.frombuffer(dim[1], np.uint8).astype(float)
    assert b.sum() < 0.6 * a.sum()


def test_shifted_dataset_shapes_and_determinism() -> None:
    x1, y1 = shifted_dataset("digits", Shift(intensity=0.5, noise=1.0), 50, seed=2)
    x2, y2 = shifted_dataset("digits", Shift(intensity=0.5, noise=1.0), 50, seed=2)
    assert x1.shape == (50, 64) and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    xv, yv = shifted_dataset("vibration", Shift(speed=1.6), 10, seed=1)
    assert xv.shape == (10, 48) and yv.shape == (10,)
