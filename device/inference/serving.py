"""The model a device answers with: swapped atomically, watched after a swap, with a shadow.

Inference never waits for an update: the updater prepares a new :class:`Predictor` on its
own thread and :meth:`ServingModel.swap` replaces one reference. For the first
``watch_inferences`` answers after a swap the previous model stays loaded; an answer
the new model cannot give (an exception or non-finite output) is served by the
previous one instead, and a burst of such errors calls ``on_error_burst`` (the updater
rolls back). A shadow model, when set, sees the same inputs; only its agreement with
the active model and its latency are recorded: it never changes an answer.

An input is validated once, by the active model; the previous and the shadow model reuse
that check when their :attr:`~Predictor.input_spec` is the same, and check it themselves
when it is not.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.device.core.errors import EdgefleetError, InputError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.runtime.predictor import Prediction, Predictor

__all__ = ["ServingModel", "WatchPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchPolicy:
    """How closely a freshly activated model is watched."""

    watch_inferences: int = 200
    max_errors: int = 3


class ServingModel:
    """Thread-safe holder of the active (and optionally shadow) :class:`Predictor`."""

    def __init__(self, metrics: Metrics | None = None, policy: WatchPolicy | None = None,
                 on_error_burst: Callable[[str], None] | None = None) -> None:
        self.metrics = metrics if metrics is not None else default_metrics()
        self.policy = policy or WatchPolicy()
        self.on_error_burst = on_error_burst
        self._lock = threading.Lock()
        self.active: Predictor | None = None
        self.shadow: Predictor | None = None
        self._previous: Predictor | None = None
        self._watch_left = 0
        self._watch_errors = 0
        self._shadow_seen = 0
        self._shadow_agree = 0
        self._shadow_ms = 0.0
        #: Counts for the active model since it was swapped in (canary health).
        self.stats = {"inferences": 0, "errors": 0, "fallback": 0}

    def swap(self, new: Predictor | None, *, watch: bool = True) -> Predictor | None:
        """Serve ``new`` from the next call on; returns the model it replaced."""
        with self._lock:
            old, self.active = self.active, new
            self._previous = old if watch else None
            self._watch_left = self.policy.watch_inferences if watch and old else 0
            self._watch_errors = 0
            self.stats = {"inferences": 0, "errors": 0, "fallback": 0}
        if new is not None:
            self.metrics.set("model_name", new.manifest.name)
            self.metrics.set("model_version", new.manifest.version)
            self.metrics.set("model_variant", new.variant)
        return old

    def set_shadow(self, candidate: Predictor | None) -> None:
        """Run ``candidate`` beside the active model (None stops shadowing)."""
        with self._lock:
            self.shadow = candidate
            self._shadow_seen = self._shadow_agree = 0
            self._shadow_ms = 0.0
        self.metrics.set("shadow_version", candidate.manifest.version if candidate else None)

    @staticmethod
    def _on(other: Predictor, model: Predictor, arr: np.ndarray, x: Any) -> Prediction:
        """``other``'s answer to an input ``model`` validated as ``arr``: the check is
        reused only if ``other`` would accept exactly the same inputs."""
        if other.input_spec == model.input_spec:
            return other.predict_validated(arr)
        return other.predict(x)

    def _model_error(self, model: Predictor, arr: np.ndarray, x: Any,
                     checked_by: Predictor | None = None
                     ) -> tuple[Prediction | None, str | None]:
        try:
            pred = (model.predict_validated(arr) if checked_by is None
                    else self._on(model, checked_by, arr, x))
        except InputError:
            raise
        except Exception as exc:  # any runtime failure is the model's, not the daemon's
            return None, f"{type(exc).__name__}: {exc}"
        if not math.isfinite(pred.confidence):
            return None, "non-finite output"
        return pred, None

    def predict(self, x: Any) -> Prediction:
        """Answer one raw sample with the active model (the previous one if it fails)."""
        return self.validate_and_predict(x)[1]

    def validate_and_predict(self, x: Any) -> tuple[np.ndarray, Prediction]:
        """:meth:`predict`, also handing back the row as the active model validated it."""
        with self._lock:
            model, previous, shadow = self.active, self._previous, self.shadow
            watching = self._watch_left > 0
            if watching:
                self._watch_left -= 1
        if model is None:
            raise EdgefleetError("no model is active")
        arr = model.validate(x)
        pred, error = self._model_error(model, arr, x)
        self._count(model, pred)
        if error is not None:
            self.metrics.inc("inference_errors")
            log.warning("model %s failed an inference: %s", model.manifest.version, error)
            if watching:
                self._count_watch_error(model, error)
            if previous is None:
                raise EdgefleetError(f"model {model.manifest.version} failed: {error}")
            pred = self._on(previous, model, arr, x)
        elif watching and self._watch_left == 0:
            with self._lock:
                self._previous = None
        assert pred is not None
        if shadow is not None:
            self._run_shadow(shadow, model, arr, x, pred)
        return arr, pred

    def _count(self, model: Predictor, pred: Prediction | None) -> None:
        tau = model.manifest.fallback_threshold
        with self._lock:
            if model is not self.active:
                return
            self.stats["inferences"] += 1
            if pred is None:
                self.stats["errors"] += 1
            elif tau is not None and pred.confidence < tau:
                self.stats["fallback"] += 1

    def health(self) -> dict[str, Any]:
        """The active model's version and counts since it was swapped in."""
        with self._lock:
            model = self.active
            return {"version": model.manifest.version if model else None, **self.stats}

    def _count_watch_error(self, model: Predictor, error: str) -> None:
        with self._lock:
            self._watch_errors += 1
            burst = self._watch_errors == self.policy.max_errors
        if burst and self.on_error_burst is not None:
            self.on_error_burst(f"{self.policy.max_errors} errors in the first "
                                f"{self.policy.watch_inferences} inferences ({error})")

    def _run_shadow(self, shadow: Predictor, model: Predictor, arr: np.ndarray, x: Any,
                    pred: Prediction) -> None:
        t0 = time.perf_counter()
        try:
            got, error = self._model_error(shadow, arr, x, checked_by=model)
        except InputError:
            return
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.observe("shadow_latency_ms", ms)
        with self._lock:
            self._shadow_seen += 1
            self._shadow_ms += ms
            if got is not None and got.label == pred.label:
                self._shadow_agree += 1
            rate = self._shadow_agree / self._shadow_seen
            mean_ms = self._shadow_ms / self._shadow_seen
        self.metrics.inc("shadow_inferences")
        if error is not None:
            self.metrics.inc("shadow_errors")
        self.metrics.set("shadow_agreement", rate)
        self.metrics.set("shadow_latency_ms_mean", mean_ms)

    def shadow_latency_ms(self) -> float | None:
        """Mean latency of the shadow candidate on the shadowed inputs."""
        with self._lock:
            return self._shadow_ms / self._shadow_seen if self._shadow_seen else None

    def shadow_agreement(self) -> float | None:
        """Fraction of shadowed inputs where the candidate gave the active model's label."""
        with self._lock:
            return self._shadow_agree / self._shadow_seen if self._shadow_seen else None
