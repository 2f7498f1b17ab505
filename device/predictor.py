"""The device's one way to run a model package: verify, validate, normalize, infer, calibrate.

:class:`Predictor` wraps an :class:`~edgefleet.device.backends.InferenceBackend` (onnxruntime
or LiteRT) with what a daemon needs around the bare runtime call: it refuses a package whose
files or golden outputs do not match its manifest, rejects bad input with a typed
:class:`~edgefleet.device.errors.InputError` (counted, never a crash), applies the manifest's
normalization and temperature, and counts every inference in the metrics registry.

The batch-1 path is kept to a handful of NumPy calls on preallocated constants because the
models are small: the runtime call itself takes microseconds, so every extra array op shows.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.backends import DEFAULT_THREADS, InferenceBackend, open_backend
from edgefleet.device.errors import InputError, UsageError
from edgefleet.device.golden import check_golden
from edgefleet.device.metrics import CONFIDENCE_BUCKETS, Metrics, default_metrics
from edgefleet.device.package import Manifest, load_package

__all__ = ["BACKENDS", "MAX_BATCH", "Prediction", "Predictor"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
BACKENDS = ("onnx", "tflite")
#: Largest batch one call accepts: bounds the memory a single bad request can claim.
MAX_BATCH = 4096
WARMUP_RUNS = 5
_FLOAT64_MAX = float(np.finfo(np.float64).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Prediction:
    """One answer: the class, its calibrated probability and how long the call took."""

    label: int
    label_name: str
    confidence: float
    probabilities: np.ndarray
    latency_ms: float


def _softmax_rows(logits: F32, inv_t: float) -> npt.NDArray[np.float64]:
    """Row-wise ``softmax(logits / T)`` in float64; shifts by the row max only when needed.

    float64 ``exp`` cannot overflow for |logit / T| < 709, so the usual max-subtraction
    (two more array ops per call) is the rare fallback, not the hot path.
    """
    e = np.multiply(logits, inv_t, dtype=np.float64)
    np.exp(e, out=e)
    s = np.add.reduce(e, axis=-1, keepdims=True)
    if not _FLOAT64_MAX > float(np.maximum.reduce(s, axis=None)) > 0 or \
            not float(np.minimum.reduce(s, axis=None)) > 0:
        z = np.multiply(logits, inv_t, dtype=np.float64)
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=-1, keepdims=True)
    np.divide(e, s, out=e)
    return e


def _softmax_one(row: F32, inv_t: float) -> npt.NDArray[np.float64]:
    """:func:`_softmax_rows` for a single row, with four array ops on the common path."""
    e = np.multiply(row, inv_t, dtype=np.float64)
    np.exp(e, out=e)
    s = float(np.add.reduce(e))
    if not _FLOAT64_MAX > s > 0:
        shifted: npt.NDArray[np.float64] = _softmax_rows(row[None, :], inv_t)[0]
        return shifted
    np.multiply(e, 1.0 / s, out=e)
    return e


class Predictor:
    """A verified model package, ready to answer on raw (un-normalized) samples.

    Example::

        p = Predictor.load("out/digits", backend="tflite")
        pred = p.predict(row)          # row: (64,) raw pixel values 0..16
        pred.label_name, pred.confidence
    """

    manifest: Manifest
    root: Path
    variant: str

    def __init__(self, manifest: Manifest, root: Path, variant: str,
                 backend: InferenceBackend, metrics: Metrics | None = None) -> None:
        self.manifest = manifest
        self.root = root
        self.variant = variant
        self.backend = backend
        self.metrics = metrics if metrics is not None else default_metrics()
        self._sample_shape = tuple(manifest.input.shape)
        self._n_in = math.prod(self._sample_shape)
        self._mean = np.asarray(manifest.normalization.mean, dtype=np.float32)
        self._std = np.asarray(manifest.normalization.std, dtype=np.float32)
        if self._mean.shape != (self._n_in,) and self._mean.size != 1:
            raise UsageError(f"normalization has {self._mean.size} values for "
                             f"{self._n_in} input features")
        self._lo = manifest.input.min_value
        self._hi = manifest.input.max_value
        self._lo_f = self._lo if self._lo is not None else -_FLOAT32_MAX
        self._hi_f = self._hi if self._hi is not None else _FLOAT32_MAX
        self._inv_t = 1.0 / manifest.temperature
        self._labels = tuple(manifest.labels)
        self._run = backend.run

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, package: Path | str, *, backend: str | None = None,
             variant: str | None = None, threads: int = DEFAULT_THREADS,
             metrics: Metrics | None = None) -> Predictor:
        """Verify ``package`` (sha256 of every file), open a variant, run its golden inputs.

        ``backend`` (``onnx``/``tflite``) picks that runtime's best variant; ``variant``
        names one exactly; neither means the manifest's default. Raises
        :class:`~edgefleet.device.errors.PackageError` or ``ModelRejected`` naming the file.
        """
        if backend is not None and backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r} (use: {', '.join(BACKENDS)})")
        if threads < 1:
            raise UsageError("threads must be >= 1")
        root = Path(package)
        manifest = load_package(root)
        if variant is None:
            variant = (manifest.variant_for_backend(backend) if backend
                       else manifest.default_variant)
        var = manifest.variant(variant)
        if backend is not None and var.format != backend:
            raise UsageError(f"variant {variant!r} is {var.format}, not {backend}")
        runner = open_backend(root, var, threads)
        worst = check_golden(manifest, variant, runner)
        log.info("loaded %s %s variant %s (golden max diff %.3g)",
                 manifest.name, manifest.version, variant, worst)
        pred = cls(manifest, root, variant, runner, metrics)
        pred.warm_up()
        return pred

    def warm_up(self, runs: int = WARMUP_RUNS) -> None:
        """Run a few mid-range samples so the first real request is not the slow one."""
        lo = self._lo if self._lo is not None else 0.0
        hi = self._hi if self._hi is not None else lo
        x = np.full((1, self._n_in), (lo + hi) / 2, dtype=np.float32)
        for _ in range(runs):
            self._run((x - self._mean) / self._std)

    # -- input validation ---------------------------------------------------------------

    def _invalid(self, reason: str, message: str) -> InputError:
        self.metrics.inc(f"inputs_invalid_{reason}")
        return InputError(message, reason=reason)

    def validate(self, x: Any) -> F32:
        """Check one sample or a batch and return it as a float32 ``(n, n_features)`` array.

        Raises :class:`InputError` with ``reason`` ``dtype``, ``shape``, ``nonfinite`` or
        ``range`` (and counts ``inputs_invalid_<reason>``).
        """
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise self._invalid("shape", f"input is not a rectangular array: {exc}") from None
        if arr.dtype != np.float32:
            if arr.dtype.kind not in "fiu":
                raise self._invalid("dtype", f"input dtype {arr.dtype} is not a real number "
                                    "type (want float32)")
            with np.errstate(over="ignore"):
                arr = arr.astype(np.float32)
        shape = arr.shape
        if shape == self._sample_shape:
            arr = arr.reshape(1, self._n_in)
        elif shape[1:] == self._sample_shape and len(shape) == len(self._sample_shape) + 1:
            if not 0 < shape[0] <= MAX_BATCH:
                raise self._invalid("shape", f"batch of {shape[0]} samples (allowed: 1.."
                                    f"{MAX_BATCH})")
            if len(shape) != 2:
                arr = arr.reshape(shape[0], self._n_in)
        else:
            raise self._invalid("shape", f"input shape {shape} (want {self._sample_shape} or "
                                f"(n, {', '.join(map(str, self._sample_shape))}))")
        # NaN fails every comparison and the bounds are finite, so one test covers range,
        # NaN and inf.
        if self._lo_f <= np.minimum.reduce(arr, axis=None) and \
                np.maximum.reduce(arr, axis=None) <= self._hi_f:
            return arr
        return self._explain(arr)

    def _explain(self, arr: F32) -> F32:
        """The slow path: say which value is wrong, and why."""
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise self._invalid("nonfinite", f"input has {int(bad.sum())} NaN/inf value(s), "
                                f"first at index {idx}")
        lo = self._lo if self._lo is not None else -math.inf
        hi = self._hi if self._hi is not None else math.inf
        out = (arr < lo) | (arr > hi)
        idx = tuple(int(i) for i in np.argwhere(out)[0])
        raise self._invalid("range", f"input value {float(arr[idx]):.6g} at index {idx} is "
                            f"outside [{lo:g}, {hi:g}]")

    # -- inference ------------------------------------------------------------------------

    def logits(self, x_raw_batch: Any) -> F32:
        """Uncalibrated logits for raw samples (validated and normalized first)."""
        return self._run((self.validate(x_raw_batch) - self._mean) / self._std)

    def predict(self, x: Any) -> Prediction:
        """One raw sample, ``(n_features,)`` or ``(1, n_features)``."""
        t0 = time.perf_counter()
        arr = self.validate(x)
        if arr.shape[0] != 1:
            raise self._invalid("shape", f"predict() takes one sample, got {arr.shape[0]}: "
                                "use predict_batch()")
        probs = _softmax_one(self._run((arr - self._mean) / self._std)[0], self._inv_t)
        label = int(probs.argmax())
        conf = float(probs[label])
        ms = (time.perf_counter() - t0) * 1e3
        m = self.metrics
        m.inc("inferences")
        m.observe("inference_latency_ms", ms)
        m.observe("inference_confidence", conf, CONFIDENCE_BUCKETS)
        return Prediction(label, self._labels[label], conf, probs, ms)

    def predict_batch(self, x: Any) -> list[Prediction]:
        """A batch of raw samples; ``latency_ms`` of each is the whole batch's wall time."""
        t0 = time.perf_counter()
        arr = self.validate(x)
        probs = _softmax_rows(self._run((arr - self._mean) / self._std), self._inv_t)
        labels = probs.argmax(axis=1)
        ms = (time.perf_counter() - t0) * 1e3
        m = self.metrics
        m.inc("inferences", len(labels))
        m.observe("inference_latency_ms", ms)
        out: list[Prediction] = []
        for row, lab in zip(probs, labels.tolist(), strict=True):
            conf = float(row[lab])
            m.observe("inference_confidence", conf, CONFIDENCE_BUCKETS)
            out.append(Prediction(lab, self._labels[lab], conf, row, ms))
        return out
