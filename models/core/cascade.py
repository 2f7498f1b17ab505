"""Choosing τ: when should a device stop trusting itself and ask the cloud scorer?

A device answers locally when its calibrated confidence is at least τ and escalates
otherwise. τ is chosen at build time on the *calibration* split (the test split stays
held out for the figures we publish), plus the task's extra calibration samples when it
has them (generated tasks: a 0.5-point target needs thousands of samples to resolve;
see ``Task.calib_pool``): the smallest τ, i.e. the fewest escalations, whose cascade
accuracy stays within ``max_loss`` of the cloud model answering everything, in at least
``confidence`` (80 %) of paired bootstrap resamples of those samples.
The choice goes into the device package's ``fallback_threshold``; only
``manifest.json`` is rewritten, so every file hash in it still holds.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.manifest import Manifest, load_package, write_manifest
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.core.tasks import get_task

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MAX_LOSS",
    "CascadePoint",
    "CascadeReport",
    "Scores",
    "apply_cascade",
    "cascade_curve",
    "choose_threshold",
    "score_samples",
    "score_split",
]

log = logging.getLogger(__name__)

#: Accuracy the cascade may lose against the cloud model alone (0.5 point).
DEFAULT_MAX_LOSS = 0.005
#: Share of bootstrap resamples of the calibration split in which τ must meet the target.
DEFAULT_CONFIDENCE = 0.8
MAX_CANDIDATES = 512
#: Rows per ``predict_batch`` call (the predictor refuses larger batches).
CHUNK = 2048


@dataclass(frozen=True)
class Scores:
    """What the cascade needs per sample: device confidence and both models' answers."""

    confidence: npt.NDArray[np.float64]
    device_pred: npt.NDArray[np.int64]
    cloud_pred: npt.NDArray[np.int64]
    y: npt.NDArray[np.int64]

    def evaluate(self, tau: float) -> CascadePoint:
        """Local share and cascade accuracy at ``tau`` (local when confidence >= tau)."""
        local = self.confidence >= tau
        pred = np.where(local, self.device_pred, self.cloud_pred)
        return CascadePoint(tau=float(tau), local_share=float(local.mean()),
                            accuracy=float(np.mean(pred == self.y)))

    @property
    def device_accuracy(self) -> float:
        """The device model answering everything."""
        return float(np.mean(self.device_pred == self.y))

    @property
    def cloud_accuracy(self) -> float:
        """The cloud model answering everything."""
        return float(np.mean(self.cloud_pred == self.y))


@dataclass(frozen=True)
class CascadePoint:
    """One point of the cascade curve."""

    tau: float
    local_share: float
    accuracy: float


def cascade_curve(scores: Scores, taus: npt.ArrayLike | None = None) -> list[CascadePoint]:
    """The cascade at each τ (default: every distinct device confidence, plus 0 and 1)."""
    grid = np.unique(np.concatenate([[0.0, 1.0], scores.confidence])) if taus is None \
        else np.asarray(taus, dtype=np.float64)
    return [scores.evaluate(float(t)) for t in grid]


def choose_threshold(scores: Scores, max_loss: float = DEFAULT_MAX_LOSS, *,
                     confidence: float = DEFAULT_CONFIDENCE, resamples: int = 1000,
                     seed: int = 0) -> CascadePoint:
    """The smallest τ whose cascade accuracy is within ``max_loss`` of the cloud alone.

    With ``confidence`` > 0 the condition must hold in that share of paired bootstrap
    resamples of the split, not just on the split itself: a calibration split of a few
    hundred samples has lucky dips where one fewer error makes a low τ look fine.
    ``confidence=0`` is the plain empirical rule. A solution always exists: with τ above
    every confidence the cascade *is* the cloud model.
    """
    if not 0.0 <= max_loss < 1.0:
        raise UsageError("max_loss must be in [0, 1)")
    if not 0.0 <= confidence < 1.0:
        raise UsageError("confidence must be in [0, 1)")
    conf = scores.confidence
    cands = np.unique(np.concatenate([[0.0], conf]))
    if len(cands) > MAX_CANDIDATES:  # bound the (samples x candidates) matrix
        cands = np.unique(np.quantile(conf, np.linspace(0.0, 1.0, MAX_CANDIDATES)))
        cands = np.unique(np.concatenate([[0.0], cands]))
    dev_ok = (scores.device_pred == scores.y).astype(np.float64)
    cloud_ok = (scores.cloud_pred == scores.y).astype(np.float64)
    local = conf[:, None] >= cands[None, :]
    # per sample and τ: +1 where the cascade is right and the cloud wrong, -1 the reverse
    diff = np.where(local, dev_ok[:, None], cloud_ok[:, None]) - cloud_ok[:, None]
    floor = -max_loss - 1e-12
    if confidence > 0.0:
        n = len(scores.y)
        counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), resamples)
        feasible = ((counts @ diff) / n >= floor).mean(axis=0) >= confidence
    else:
        feasible = diff.mean(axis=0) >= floor
    if feasible.any():
        return scores.evaluate(float(cands[int(np.argmax(feasible))]))
    above = float(np.nextafter(conf.max(initial=0.0), np.inf))
    return scores.evaluate(min(above, 1.0))


def score_split(device: Predictor, cloud: Predictor, split: str = "calib") -> Scores:
    """Run both packages on ``calib`` (the task's calibration pool) or ``test``."""
    if device.manifest.task != cloud.manifest.task:
        raise UsageError(f"device package is for task {device.manifest.task!r} but the cloud "
                         f"package is for {cloud.manifest.task!r}")
    if list(device.manifest.labels) != list(cloud.manifest.labels):
        raise UsageError("device and cloud packages have different labels")
    task = get_task(device.manifest.task)
    if split == "calib":
        x, y = task.calib_pool()
    else:
        data = task.split()
        x, y = data.x_test, data.y_test
    return score_samples(device, cloud, x, y)


def score_samples(device: Predictor, cloud: Predictor, x: npt.NDArray[np.floating],
                  y: npt.NDArray[np.integer]) -> Scores:
    """Both packages' answers on any labelled samples (in chunks the predictor accepts)."""
    conf: list[float] = []
    dev_pred: list[int] = []
    cloud_pred: list[int] = []
    for start in range(0, len(y), CHUNK):
        rows = x[start:start + CHUNK]
        dev = device.predict_batch(rows)
        conf += [p.confidence for p in dev]
        dev_pred += [p.label for p in dev]
        cloud_pred += [p.label for p in cloud.predict_batch(rows)]
    return Scores(confidence=np.array(conf, dtype=np.float64),
                  device_pred=np.array(dev_pred, dtype=np.int64),
                  cloud_pred=np.array(cloud_pred, dtype=np.int64),
                  y=np.asarray(y, dtype=np.int64))


@dataclass(frozen=True)
class CascadeReport:
    """What ``models cascade`` decided and how the cascade does on both splits."""

    tau: float
    max_loss: float
    confidence: float
    calib: dict[str, float]
    test: dict[str, float]
    cloud_model: str

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` and the manifest."""
        return asdict(self)


def _summary(scores: Scores, tau: float) -> dict[str, float]:
    point = scores.evaluate(tau)
    return {"local_share": point.local_share, "cascade_accuracy": point.accuracy,
            "device_accuracy": scores.device_accuracy, "cloud_accuracy": scores.cloud_accuracy,
            "samples": float(len(scores.y))}


def apply_cascade(device_pkg: Path | str, cloud_pkg: Path | str, *,
                  max_loss: float = DEFAULT_MAX_LOSS, confidence: float = DEFAULT_CONFIDENCE,
                  write: bool = True) -> CascadeReport:
    """Choose τ for ``device_pkg`` against ``cloud_pkg`` and store it in its manifest.

    Both packages are verified first. The manifest gets ``fallback_threshold`` and, under
    ``metrics.cascade``, the calibration and test figures at that τ.
    """
    device = Predictor.load(device_pkg, threads=1)
    cloud = Predictor.load(cloud_pkg, threads=1)
    calib = score_split(device, cloud, "calib")
    point = choose_threshold(calib, max_loss, confidence=confidence)
    test = score_split(device, cloud, "test")
    cm = cloud.manifest
    report = CascadeReport(tau=point.tau, max_loss=max_loss, confidence=confidence,
                           calib=_summary(calib, point.tau), test=_summary(test, point.tau),
                           cloud_model=f"{cm.name}@{cm.version}")
    log.info("τ=%.4f: %.1f%% local on the calibration split", point.tau,
             100 * point.local_share)
    if write:
        set_fallback_threshold(device_pkg, point.tau, metrics={"cascade": report.as_dict()})
    return report


def set_fallback_threshold(package: Path | str, tau: float | None,
                           metrics: dict[str, Any] | None = None) -> Manifest:
    """Rewrite ``manifest.json`` with a new τ (files untouched, so their hashes still hold)."""
    root = Path(package)
    manifest = load_package(root)
    data = manifest.model_dump()
    data["fallback_threshold"] = tau
    data["metrics"] = {**manifest.metrics, **(metrics or {})}
    updated = Manifest.model_validate(data)
    write_manifest(root, updated)
    return updated
