"""The hybrid cascade: answer locally when sure, ask the cloud scorer when not.

A device answers with its own int8 model when the calibrated confidence is at least τ
(the package's ``fallback_threshold``, or the config's override). Below τ it may
escalate, as far as its privacy policy allows: ``off`` (nothing leaves the device),
``features`` (only the model input) or ``raw`` (also the raw sensor sample). The cloud's
answer is used if it arrives before the deadline; otherwise the local answer is returned
flagged ``degraded``, so a slow or absent scorer costs at most the deadline, never an
answer. Every outcome is counted in the metrics registry (``fallback_*``).

The input is validated once, by the predictor's ``validate_and_predict``, which also hands
back the checked row that an escalation sends.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from edgefleet.device.core.config import StrictModel
from edgefleet.device.core.metrics import LATENCY_BUCKETS_MS, Metrics, default_metrics
from edgefleet.device.inference.score_client import ScoreClient
from edgefleet.device.runtime.manifest import Manifest
from edgefleet.device.runtime.predictor import Prediction
from edgefleet.device.wire.scoring import (
    ScoreProtocolError,
    ScoreRequest,
    decode_reply,
    encode,
)

__all__ = ["Answer", "FallbackConfig", "HybridPredictor", "LocalModel", "Source"]

log = logging.getLogger(__name__)

Source = Literal["local", "cloud", "degraded"]
#: What an escalation may send (``off`` never escalates).
EscalationMode = Literal["features", "raw"]


class LocalModel(Protocol):
    """What the cascade needs of the model that answers locally.

    A :class:`~edgefleet.device.runtime.predictor.Predictor` is one; so is the agent's
    view of whatever model its :class:`~edgefleet.device.inference.serving.ServingModel`
    has active right now.
    """

    @property
    def manifest(self) -> Manifest: ...

    def validate_and_predict(self, x: Any) -> tuple[np.ndarray, Prediction]: ...


class FallbackConfig(StrictModel):
    """``[fallback]`` in the device config."""

    mode: Literal["off", "features", "raw"] = Field(
        default="features", description="What may leave the device when it escalates.")
    threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="τ override; unset means the model package's fallback_threshold.")
    deadline_ms: float = Field(default=200.0, gt=0, le=60_000,
                               description="Longest a prediction waits for the cloud.")
    qos: Literal[0, 1] = 0


@dataclass(frozen=True, init=False)
class Answer:
    """The prediction a caller uses, where it came from, and the local one behind it.

    ``source`` is ``local`` (confident, or policy ``off``), ``cloud`` (the scorer's answer)
    or ``degraded`` (wanted the cloud, did not get it in time: the local answer).
    """

    prediction: Prediction
    source: Source
    local: Prediction
    escalated: bool
    latency_ms: float
    #: Why a degraded answer is degraded (timeout, not_connected, bad_reply, ...).
    reason: str | None = None
    #: ``name@version`` of the model that answered.
    model: str = ""
    scorer: str | None = None

    def __init__(self, prediction: Prediction, source: Source, local: Prediction,
                 escalated: bool, latency_ms: float, reason: str | None = None,
                 model: str = "", scorer: str | None = None) -> None:
        # As Prediction: the generated frozen __init__ costs ~2 µs per answer.
        self.__dict__.update(prediction=prediction, source=source, local=local,
                             escalated=escalated, latency_ms=latency_ms, reason=reason,
                             model=model, scorer=scorer)


class HybridPredictor:
    """Wraps a :class:`LocalModel` with the cascade policy and a :class:`ScoreClient`."""

    def __init__(self, predictor: LocalModel, cfg: FallbackConfig | None = None,
                 client: ScoreClient | None = None, metrics: Metrics | None = None) -> None:
        self.predictor = predictor
        self.cfg = cfg or FallbackConfig()
        self.client = client
        self.metrics = metrics if metrics is not None else default_metrics()
        m = predictor.manifest
        self._model = f"{m.name}@{m.version}"
        self._labels = tuple(m.labels)

    @property
    def tau(self) -> float | None:
        """The threshold in force (config override first); None: never escalate."""
        if self.cfg.threshold is not None:
            return self.cfg.threshold
        return self.predictor.manifest.fallback_threshold

    def predict(self, x: Any, raw: Any = None) -> Answer:
        """One sample; ``raw`` is the sensor sample behind ``x`` (sent only in ``raw`` mode).

        Raises :class:`~edgefleet.device.core.errors.InputError` for a bad ``x`` (as the
        predictor does); everything that goes wrong on the way to the cloud degrades.
        """
        t0 = time.perf_counter()
        features, local = self.predictor.validate_and_predict(x)
        tau = self.tau
        if tau is None or local.confidence >= tau:
            return self._done(t0, local, local, "local", escalated=False)
        mode = self.cfg.mode
        if mode == "off":
            self.metrics.inc("fallback_off")
            return self._done(t0, local, local, "local", escalated=False, reason="policy_off")
        self.metrics.inc("fallback_escalations")
        if self.client is None:
            return self._degrade(t0, local, "no_client")
        try:
            payload = self._request(features, raw, mode)
        except ValueError as exc:  # e.g. a raw sample with NaN or of a silly size
            log.info("escalation not sent: %s", exc)
            return self._degrade(t0, local, "bad_raw")
        remaining = self.cfg.deadline_ms / 1e3 - (time.perf_counter() - t0)
        reply_bytes = self.client.request(payload, max(remaining, 0.0))
        if reply_bytes is None:
            reason = "not_connected" if not self.client.connected else "timeout"
            return self._degrade(t0, local, reason)
        try:
            reply = decode_reply(reply_bytes, len(self._labels))
        except ScoreProtocolError as exc:
            log.warning("bad reply from the scorer: %s", exc)
            return self._degrade(t0, local, "bad_reply")
        if not reply.ok:
            self.metrics.inc(f"fallback_scorer_error_{reply.error}")
            return self._degrade(t0, local, "scorer_error")
        probs = np.asarray(reply.probabilities or [], dtype=np.float64)
        label = int(reply.label or 0)
        cloud = Prediction(label, self._labels[label], float(reply.confidence or 0.0), probs,
                           (time.perf_counter() - t0) * 1e3)
        return self._done(t0, cloud, local, "cloud", escalated=True, model=reply.model,
                          scorer=reply.scorer)

    def _request(self, features: np.ndarray, raw: Any, mode: EscalationMode) -> bytes:
        m = self.predictor.manifest
        raw_list = None
        if mode == "raw" and raw is not None:
            raw_list = np.asarray(raw, dtype=np.float32).ravel().tolist()
        req = ScoreRequest(task=m.task, model=self._model, mode=mode,
                           features=features.ravel().tolist(), raw=raw_list,
                           deadline_ms=self.cfg.deadline_ms)
        return encode(req)

    def _degrade(self, t0: float, local: Prediction, reason: str) -> Answer:
        self.metrics.inc(f"fallback_degraded_{reason}")
        return self._done(t0, local, local, "degraded", escalated=True, reason=reason)

    def _done(self, t0: float, pred: Prediction, local: Prediction, source: Source, *,
              escalated: bool, reason: str | None = None, model: str | None = None,
              scorer: str | None = None) -> Answer:
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.inc(f"fallback_{source}")
        if escalated:
            self.metrics.observe("fallback_escalation_ms", ms, LATENCY_BUCKETS_MS)
        return Answer(pred, source, local, escalated, ms, reason, model or self._model, scorer)
