"""Distribution shifts for the simulated sensors: the field changing under a deployed model.

``--shift`` of ``edgefleet-sensor-sim`` and the retraining test use the same
:class:`Shift`, so the data a device sees after a shift, the data it trains on and the
data its accuracy is measured on come from one definition:

* ``vibration``: ``speed=K`` runs the machine at K times its usual shaft speed (the
  training data cover 20-40 Hz; ``speed=1.6`` gives 32-64 Hz, so every fault pattern,
  a bearing defect's impact rate included, moves to other frequency bands), ``gain=G``
  scales the accelerometer (a re-mounted or different sensor).
* ``digits``: ``intensity=K`` scales the pixel values (a dimmer or brighter camera),
  ``noise=S`` adds Gaussian noise of standard deviation S pixel levels, ``rotation=D``
  turns the camera D degrees (counter-clockwise), ``thickness=T`` (-1 to 1) draws the
  strokes thicker (towards a 3x3 grey dilation at 1) or thinner (towards an erosion at -1);
  all clipped to the sensor's 0-16 range. Geometry first, then light, then noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError

__all__ = ["Shift", "package_accuracy", "shifted_dataset", "shifted_pixels", "shifted_windows"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_KEYS = {"vibration": ("speed", "gain"), "digits": ("intensity", "noise", "rotation",
                                                    "thickness")}
#: The values each key accepts (inclusive); a key not listed must be positive.
_RANGES = {"noise": (0.0, math.inf), "rotation": (-180.0, 180.0), "thickness": (-1.0, 1.0)}
DIGIT_MAX = 16.0


@dataclass(frozen=True)
class Shift:
    """How far the simulated field moved from the training distribution (identity by default)."""

    speed: float = 1.0
    gain: float = 1.0
    intensity: float = 1.0
    noise: float = 0.0
    rotation: float = 0.0
    thickness: float = 0.0

    @classmethod
    def parse(cls, text: str, task: str) -> Shift:
        """``"speed=1.6"`` or ``"intensity=0.5,noise=2,rotation=15"``; keys must fit ``task``."""
        allowed = _KEYS.get(task, ())
        values: dict[str, float] = {}
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in allowed:
                raise UsageError(f"--shift {part!r}: {task} knows "
                                 f"{', '.join(k + '=NUMBER' for k in allowed)}")
            try:
                values[key] = float(raw)
            except ValueError:
                raise UsageError(f"--shift {part!r}: {raw!r} is not a number") from None
            lo, hi = _RANGES.get(key, (0.0, math.inf))
            if not (lo <= values[key] <= hi and math.isfinite(values[key])
                    and (key in _RANGES or values[key] > 0)):
                raise UsageError(f"--shift {part!r}: " + (
                    f"must be between {lo:g} and {hi:g}" if key in _RANGES and hi < math.inf
                    else "must be a finite number" + (" ≥ 0" if key in _RANGES else " > 0")))
        return cls(**values)

    @property
    def identity(self) -> bool:
        """True when nothing is shifted."""
        return self == Shift()

    def describe(self) -> str:
        """``speed=1.6`` (only the keys that differ from no shift)."""
        base = Shift()
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in fields(self)
                        if getattr(self, f.name) != getattr(base, f.name)) or "none"


def _geometry(x: F32, shift: Shift) -> F32:
    """Rotation and stroke thickness on square images (any leading/trailing layout that
    holds n square single-channel images, e.g. ``(n, 64)`` or ``(n, 8, 8, 1)``)."""
    from scipy import ndimage

    side = math.isqrt(x.size // max(len(x), 1)) if x.ndim > 1 else math.isqrt(x.size)
    imgs = x.reshape(-1, side, side)
    if shift.rotation:
        imgs = ndimage.rotate(imgs, shift.rotation, axes=(2, 1), reshape=False, order=1,
                              mode="constant", cval=0.0)
    if shift.thickness:
        morph = ndimage.grey_dilation if shift.thickness > 0 else ndimage.grey_erosion
        moved = morph(imgs, footprint=np.ones((1, 3, 3), bool) if shift.thickness > 0
                      else np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
        t = abs(shift.thickness)
        imgs = (1.0 - t) * imgs + t * moved
    out: F32 = np.asarray(imgs, dtype=np.float32).reshape(x.shape)
    return out


def shifted_pixels(pixels: npt.ArrayLike, shift: Shift, rng: np.random.Generator) -> F32:
    """Digits pixels (0-16) as the shifted camera would deliver them."""
    x = np.asarray(pixels, dtype=np.float32)
    if shift.rotation or shift.thickness:
        x = _geometry(x, shift)
    x = x * shift.intensity
    if shift.noise > 0:
        x = x + rng.normal(0.0, shift.noise, size=x.shape).astype(np.float32)
    out: F32 = np.clip(x, 0.0, DIGIT_MAX).astype(np.float32)
    return out


def shifted_windows(labels: npt.ArrayLike, shift: Shift, rng: np.random.Generator
                    ) -> Iterator[npt.NDArray[np.float64]]:
    """Raw vibration windows for ``labels`` from the shifted machine and sensor."""
    from edgefleet.models.core.vibration import simulate_window

    for label in np.asarray(labels).ravel():
        yield simulate_window(int(label), rng, speed=shift.speed) * shift.gain


def shifted_dataset(task: str, shift: Shift, n: int, seed: int) -> tuple[F32, I64]:
    """``n`` labelled feature rows (what the device model sees) from the shifted field.

    digits: shifted test-split images (never trained on); vibration: fresh windows.
    """
    rng = np.random.default_rng(seed)
    if task == "digits":
        from edgefleet.models.core.tasks import get_task

        split = get_task("digits").split()
        idx = rng.integers(0, len(split.y_test), size=n)
        pixels = np.round(shifted_pixels(split.x_test[idx], shift, rng))
        return pixels.astype(np.float32), split.y_test[idx].astype(np.int64)
    if task == "vibration":
        from edgefleet.device.input.features import band_energies
        from edgefleet.models.core.vibration import LABELS

        y = rng.integers(len(LABELS), size=n).astype(np.int64)
        windows = np.stack(list(shifted_windows(y, shift, rng))).astype(np.float32)
        return band_energies(windows).astype(np.float32), y
    raise UsageError(f"no shift is defined for task {task!r}")


def package_accuracy(package: Path | str, x: F32, y: I64) -> float:
    """Accuracy of a model package's default variant on raw samples ``x``."""
    from edgefleet.device.runtime.backends import open_backend
    from edgefleet.device.runtime.golden import normalize
    from edgefleet.device.runtime.manifest import load_package

    manifest = load_package(Path(package))
    variant = manifest.variants[manifest.default_variant]
    backend = open_backend(Path(package), variant, threads=1)
    logits = backend.run(normalize(x, manifest.normalization))
    return float(np.mean(logits.argmax(1) == y))
