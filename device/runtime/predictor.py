"""The device's one way to run a model package: verify, validate, normalize, infer, calibrate.

:class:`Predictor` wraps an :class:`~edgefleet.device.runtime.backends.InferenceBackend`
(onnxruntime
or LiteRT) with what a daemon needs around the bare runtime call: it refuses a package whose
files or golden outputs do not match its manifest, rejects bad input with a typed
:class:`~edgefleet.device.core.errors.InputError` (counted, never a crash), applies the manifest's
normalization and temperature, and counts every inference in the metrics registry.

The batch-1 path is kept to a handful of NumPy calls on constants prepared at load because
the models are small: the runtime call itself takes microseconds, so every extra array op
shows. For an int8 LiteRT model normalization is fused into the input quantization
(``x * a + b``, clipped, rounded) and the output softmax is a lookup in a 256-entry table
of ``exp((q - zero_point) * scale / T)``. Each input is validated exactly once:
:meth:`Predictor.predict` validates, and callers that validated already (the cascade,
the serving holder) use :meth:`Predictor.predict_validated`.
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

from edgefleet.device.core.errors import InputError, UsageError
from edgefleet.device.core.metrics import (
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS_MS,
    Metrics,
    default_metrics,
)
from edgefleet.device.runtime.backends import DEFAULT_THREADS, InferenceBackend, open_backend
from edgefleet.device.runtime.golden import check_golden
from edgefleet.device.runtime.manifest import Manifest, QuantParams, load_package

__all__ = ["BACKENDS", "MAX_BATCH", "InputSpec", "Prediction", "Predictor"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
BACKENDS = ("onnx", "tflite")
#: Largest batch one call accepts: bounds the memory a single bad request can claim.
MAX_BATCH = 4096
WARMUP_RUNS = 5
_FLOAT64_MAX = float(np.finfo(np.float64).max)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_F32 = np.dtype(np.float32)
#: int8 range as 0-d float32 arrays (a 0-d operand is much cheaper than a Python scalar).
_Q_MIN = np.array(-128, dtype=np.float32)
_Q_MAX = np.array(127, dtype=np.float32)
_clock = time.perf_counter
_count, _ge, _le = np.count_nonzero, np.greater_equal, np.less_equal
#: What a validated input was checked against: sample shape, min_value, max_value.
InputSpec = tuple[tuple[int, ...], float | None, float | None]


@dataclass(frozen=True, init=False)
class Prediction:
    """One answer: the class, its calibrated probability and how long the call took."""

    label: int
    label_name: str
    confidence: float
    probabilities: np.ndarray
    latency_ms: float

    def __init__(self, label: int, label_name: str, confidence: float,
                 probabilities: np.ndarray, latency_ms: float) -> None:
        # The generated frozen __init__ calls object.__setattr__ per field (about 1 µs on
        # the batch-1 path); filling __dict__ keeps the instance just as frozen.
        d = self.__dict__
        d["label"] = label
        d["label_name"] = label_name
        d["confidence"] = confidence
        d["probabilities"] = probabilities
        d["latency_ms"] = latency_ms


def _f32_bound(value: float, *, up: bool) -> npt.NDArray[np.float32]:
    """``value`` as a 0-d float32 array, rounded inwards (``up`` for a lower bound), so a
    float32 input passes the float32 comparison exactly when it passes against the exact
    float64 bound; a bound beyond float32's range becomes its largest finite value, which
    still rejects inf."""
    with np.errstate(over="ignore"):
        b = np.float32(value)
    # float(b): NumPy would compare a float32 scalar with a Python float in float32.
    if up and float(b) < value:
        b = np.nextafter(b, np.float32(np.inf))
    elif not up and float(b) > value:
        b = np.nextafter(b, np.float32(-np.inf))
    return np.array(b, dtype=np.float32)


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


def _softmax_one(row: F32, inv_t: npt.NDArray[np.float64],
                 ones: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """:func:`_softmax_rows` for a single row, with four array ops on the common path.

    ``inv_t`` is a 0-d float64 array: NumPy converts a 0-d operand several times faster
    than a Python float, and it promotes a float32 row to float64 on its own. The sum is
    a dot product with ``ones`` (a row of 1.0): half the call overhead of ``add.reduce``.
    """
    e: npt.NDArray[np.float64] = np.multiply(row, inv_t)
    np.exp(e, out=e)
    s = e.dot(ones)
    if not _FLOAT64_MAX > s > 0:
        shifted: npt.NDArray[np.float64] = _softmax_rows(row[None, :], float(inv_t))[0]
        return shifted
    np.divide(e, s, out=e)
    return e


def _exp_table(q: QuantParams, inv_t: float) -> npt.NDArray[np.float64]:
    """``exp(logit(q) / T - c)`` for every int8 ``q``, indexable by the int8 value itself.

    ``logit(q)`` is computed exactly as the backend dequantizes (float32); ``c`` is the
    largest entry's exponent, so entries lie in (0, 1] and cannot overflow (softmax does
    not change under a constant shift). Entry ``i`` is ``q = i`` for ``i < 128`` and
    ``q = i - 256`` above, so ``table.take(int8_row)`` needs no offset: ``take`` reads a
    negative index from the end.
    """
    levels = np.arange(-128, 128)
    logits = np.subtract(levels, q.zero_point, dtype=np.float32)
    np.multiply(logits, q.scale, out=logits)
    z = np.multiply(logits, inv_t, dtype=np.float64)
    z -= z.max()
    return np.roll(np.exp(z), -128)


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
        mean = np.asarray(manifest.normalization.mean, dtype=np.float64)
        std = np.asarray(manifest.normalization.std, dtype=np.float64)
        if mean.shape != (self._n_in,) and mean.size != 1:
            raise UsageError(f"normalization has {mean.size} values for "
                             f"{self._n_in} input features")
        # (1, n) rows broadcast against a validated (n_rows, n) batch.
        self._mean = mean.astype(np.float32).reshape(1, -1)
        self._std = std.astype(np.float32).reshape(1, -1)
        self._lo = manifest.input.min_value
        self._hi = manifest.input.max_value
        self._lo32 = _f32_bound(self._lo if self._lo is not None else -_FLOAT32_MAX, up=True)
        self._hi32 = _f32_bound(self._hi if self._hi is not None else _FLOAT32_MAX, up=False)
        #: What :meth:`validate` checks against; equal specs accept exactly the same inputs.
        self.input_spec: InputSpec = (self._sample_shape, self._lo, self._hi)
        self._inv_t = 1.0 / manifest.temperature
        self._inv_t0 = np.array(self._inv_t, dtype=np.float64)
        self._labels = tuple(manifest.labels)
        self._ones = np.ones(len(self._labels), dtype=np.float64)
        self._run_raw = backend.run_raw
        self._in_q = in_q = backend.input_quant
        self._out_q = out_q = backend.output_quant
        self._qa: F32 | None = None
        self._qb: F32 | None = None
        if in_q is not None:
            # round(((x - mean) / std) / scale) + zp as one affine map, x * a + b.
            k = std * in_q.scale
            self._qa = (1.0 / k).astype(np.float32).reshape(1, -1)
            self._qb = (in_q.zero_point - mean / k).astype(np.float32).reshape(1, -1)
        self._table = _exp_table(out_q, self._inv_t) if out_q is not None else None
        self._record = self.metrics.recorder(
            "inferences", ("inference_latency_ms", LATENCY_BUCKETS_MS),
            ("inference_confidence", CONFIDENCE_BUCKETS))

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def load(cls, package: Path | str, *, backend: str | None = None,
             variant: str | None = None, threads: int = DEFAULT_THREADS,
             metrics: Metrics | None = None) -> Predictor:
        """Verify ``package`` (sha256 of every file), open a variant, run its golden inputs.

        ``backend`` (``onnx``/``tflite``) picks that runtime's best variant; ``variant``
        names one exactly; neither means the manifest's default. Raises
        :class:`~edgefleet.device.core.errors.PackageError` or ``ModelRejected`` naming the file.
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
        rule = manifest.golden_rule(variant)
        log.info("loaded %s %s variant %s (golden max diff %.3g, %s)", manifest.name,
                 manifest.version, variant, worst,
                 f"{rule.rule} rule, atol {rule.atol:.3g}" if rule else "golden_atol")
        pred = cls(manifest, root, variant, runner, metrics)
        pred.warm_up()
        return pred

    def warm_up(self, runs: int = WARMUP_RUNS) -> None:
        """Run a few mid-range samples so the first real request is not the slow one."""
        lo = self._lo if self._lo is not None else 0.0
        hi = self._hi if self._hi is not None else lo
        x = np.full((1, self._n_in), (lo + hi) / 2, dtype=np.float32)
        for _ in range(runs):
            self._probs_one(self._forward(x))

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
        if arr.dtype is not _F32:
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
        # NaN fails every comparison and the bounds are finite, so counting the values
        # inside them covers range, NaN and inf (two compares and two counts: half the
        # cost of min/max reductions on a small row).
        n = arr.size
        if _count(_ge(arr, self._lo32)) == n and _count(_le(arr, self._hi32)) == n:
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

    def _forward(self, arr: F32) -> npt.NDArray[Any]:
        """The runtime's raw output for validated rows: int8 for a full-integer model."""
        qa, qb = self._qa, self._qb
        if qa is None or qb is None:
            f = np.subtract(arr, self._mean)
            np.divide(f, self._std, out=f)
            return self._run_raw(f)
        q = np.multiply(arr, qa)
        np.add(q, qb, out=q)
        np.maximum(q, _Q_MIN, out=q)
        np.minimum(q, _Q_MAX, out=q)
        np.rint(q, out=q)
        return self._run_raw(q.astype(np.int8))

    def _dequantize(self, out: npt.NDArray[Any]) -> F32:
        """Float32 logits from the runtime's raw output (as ``backend.run`` returns them)."""
        q = self._out_q
        if q is None or self._table is None:
            return np.asarray(out, dtype=np.float32)
        deq: F32 = np.subtract(out, q.zero_point, dtype=np.float32)
        np.multiply(deq, q.scale, out=deq)
        return deq

    def _probs_one(self, out: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Calibrated probabilities of a one-row raw output."""
        table = self._table
        if table is None:
            return _softmax_one(out[0], self._inv_t0, self._ones)
        e: npt.NDArray[np.float64] = table.take(out[0])
        s = e.dot(self._ones)
        if not s > 0:  # every entry underflowed: shift by this row's own max instead
            return _softmax_one(self._dequantize(out)[0], self._inv_t0, self._ones)
        np.divide(e, s, out=e)
        return e

    def _probs_rows(self, out: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """Calibrated probabilities of a raw output batch."""
        table = self._table
        if table is None:
            return _softmax_rows(np.asarray(out, dtype=np.float32), self._inv_t)
        e: npt.NDArray[np.float64] = table.take(out)
        s = np.add.reduce(e, axis=-1, keepdims=True)
        if not np.all(s > 0):
            return _softmax_rows(self._dequantize(out), self._inv_t)
        np.divide(e, s, out=e)
        return e

    def logits(self, x_raw_batch: Any) -> F32:
        """Uncalibrated logits for raw samples (validated and normalized first)."""
        return self._dequantize(self._forward(self.validate(x_raw_batch)))

    def _one(self, arr: F32, t0: float) -> Prediction:
        if arr.shape[0] != 1:
            raise self._invalid("shape", f"predict() takes one sample, got {arr.shape[0]}: "
                                "use predict_batch()")
        probs = self._probs_one(self._forward(arr))
        label = int(probs.argmax())
        conf = float(probs[label])
        ms = (_clock() - t0) * 1e3
        self._record(ms, conf)
        return Prediction(label, self._labels[label], conf, probs, ms)

    def predict(self, x: Any) -> Prediction:
        """One raw sample, ``(n_features,)`` or ``(1, n_features)``."""
        t0 = _clock()
        return self._one(self.validate(x), t0)

    def validate_and_predict(self, x: Any) -> tuple[F32, Prediction]:
        """:meth:`predict`, also handing back the validated ``(1, n_features)`` row.

        For callers that need the checked input afterwards (the cascade escalates it), so
        they do not validate it a second time.
        """
        t0 = _clock()
        arr = self.validate(x)
        return arr, self._one(arr, t0)

    def predict_validated(self, arr: F32) -> Prediction:
        """One row that :meth:`validate` already accepted, by this predictor or one with
        an equal :attr:`input_spec`: it is not checked again (the runtime does not care
        who validated it; NaN or out-of-range values would go straight to the model)."""
        return self._one(arr, _clock())

    def predict_batch(self, x: Any) -> list[Prediction]:
        """A batch of raw samples; ``latency_ms`` of each is the whole batch's wall time."""
        t0 = _clock()
        return self._batch(self.validate(x), t0)

    def predict_batch_validated(self, arr: F32) -> list[Prediction]:
        """:meth:`predict_batch` on rows :meth:`validate` already accepted (see
        :meth:`predict_validated`)."""
        return self._batch(arr, _clock())

    def _batch(self, arr: F32, t0: float) -> list[Prediction]:
        probs = self._probs_rows(self._forward(arr))
        labels = probs.argmax(axis=1)
        ms = (_clock() - t0) * 1e3
        m = self.metrics
        m.inc("inferences", len(labels))
        m.observe("inference_latency_ms", ms)
        out: list[Prediction] = []
        for row, lab in zip(probs, labels.tolist(), strict=True):
            conf = float(row[lab])
            m.observe("inference_confidence", conf, CONFIDENCE_BUCKETS)
            out.append(Prediction(lab, self._labels[lab], conf, row, ms))
        return out
