"""The label intake: what may enter the sample store, from which source, and what is refused.

Every label path (local API, serial label frames, the scorer's answers, an imported
file) ends here. A label names a class of the active model (index, or label name) and
a sample: the input itself, or an answer the agent gave recently (by the answer's
``id``, or for the serial link by the sensor and sequence number of the frame). The
input is checked by the model's own validator (shape, dtype, finite, range) before
anything is written; a refused label is counted as ``data_labels_refused_<reason>``
and stored nowhere. Reasons: :data:`REFUSALS`.
"""

from __future__ import annotations

import collections
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import EdgefleetError, InputError
from edgefleet.device.core.metrics import Metrics, default_metrics
from edgefleet.device.data.store import SampleStore

__all__ = ["REFUSALS", "AnswerMemory", "LabelIntake", "LabelRefused", "Remembered"]

F32 = npt.NDArray[np.float32]

#: Why a label was refused.
REFUSALS = ("unknown_class", "unknown_answer", "bad_input", "not_finite", "bad_request",
            "source_disabled", "low_confidence", "no_model", "store_error")


class LabelRefused(EdgefleetError):
    """A label that did not enter the store; ``reason`` is one of :data:`REFUSALS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Remembered:
    """An answered sample kept for a while so that it can be labelled later."""

    x: F32
    model: str
    ts: float


class AnswerMemory:
    """The last ``size`` answered inputs by answer id, and by (sensor, seq) for frames."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._by_id: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        self._by_frame: collections.OrderedDict[tuple[int, int], str] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self._prefix = os.urandom(4).hex()
        self._n = 0

    def new_id(self) -> str:
        """An answer id with nothing kept behind it (an agent that stores no samples)."""
        with self._lock:
            self._n += 1
            return f"{self._prefix}-{self._n}"

    def remember(self, x: Any, model: str, frame: tuple[int, int] | None = None) -> str:
        """Keep ``x``; returns the answer id to hand out with the answer."""
        arr = np.array(x, dtype=np.float32, copy=True)
        with self._lock:
            self._n += 1
            answer_id = f"{self._prefix}-{self._n}"
            self._by_id[answer_id] = Remembered(arr, model, time.time())
            if len(self._by_id) > self.size:
                self._by_id.popitem(last=False)
            if frame is not None:
                self._by_frame[frame] = answer_id
                if len(self._by_frame) > self.size:
                    self._by_frame.popitem(last=False)
        return answer_id

    def get(self, answer_id: str) -> Remembered | None:
        """The remembered sample of an answer id (None: unknown or forgotten)."""
        with self._lock:
            return self._by_id.get(answer_id)

    def by_frame(self, sensor: int, seq: int) -> Remembered | None:
        """The remembered sample of a frame's answer."""
        with self._lock:
            answer_id = self._by_frame.get((sensor, seq))
            return self._by_id.get(answer_id) if answer_id is not None else None


class LabelIntake:
    """Checks labels and writes the good ones to the store.

    ``validate`` is the active model's input validator (raises :class:`InputError`);
    ``labels`` returns the active model's class names; ``model`` its ``name@version``.
    ``enabled`` is the set of sources the policy allows.
    """

    def __init__(self, store: SampleStore, validate: Callable[[Any], F32],
                 labels: Callable[[], list[str]], model: Callable[[], str], *,
                 enabled: set[str], memory: AnswerMemory | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.validate = validate
        self.labels = labels
        self.model = model
        self.enabled = enabled
        self.memory = memory or AnswerMemory()
        self.metrics = metrics if metrics is not None else default_metrics()

    def refuse(self, reason: str, message: str) -> LabelRefused:
        """Count a refusal and return the exception to raise."""
        self.metrics.inc(f"data_labels_refused_{reason}")
        return LabelRefused(reason, message)

    def class_index(self, value: Any) -> int:
        """A class given as index or label name, checked against the active model."""
        try:
            names = self.labels()
        except EdgefleetError:
            raise self.refuse("no_model", "no model is active: cannot check labels") from None
        if isinstance(value, bool):
            raise self.refuse("unknown_class", f"class {value!r} is not a class index or name")
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise self.refuse("unknown_class", f"class {value!r} is not a class index")
        if isinstance(value, int | float):
            idx = int(value)
            if 0 <= idx < len(names):
                return idx
            raise self.refuse("unknown_class", f"class {idx} is not one of 0..{len(names) - 1}")
        if isinstance(value, str) and value in names:
            return names.index(value)
        raise self.refuse("unknown_class", f"class {value!r} is not one of the model's labels")

    def checked_input(self, x: Any) -> F32:
        """The model input, validated like an inference input; NaN/inf named apart."""
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise self.refuse("bad_input", "input must be numbers") from None
        if arr.size and not np.all(np.isfinite(arr)):
            raise self.refuse("not_finite", "input holds NaN or inf")
        try:
            checked = self.validate(arr)
        except InputError as exc:
            reason = "not_finite" if exc.reason == "nonfinite" else "bad_input"
            raise self.refuse(reason, f"input refused by the model: {exc}") from None
        except EdgefleetError as exc:
            raise self.refuse("no_model", str(exc)) from None
        if checked.shape[0] != 1:
            raise self.refuse("bad_input", f"one sample per label, got {checked.shape[0]}")
        row: F32 = checked[0]
        return row

    def _source(self, source: str) -> None:
        if source not in self.enabled:
            raise self.refuse("source_disabled", f"labels from {source!r} are off by policy")

    def _write(self, x: F32, label: int, source: str, model: str) -> int:
        try:
            return self.store.add(x, label, source, model)
        except (EdgefleetError, OSError, ValueError) as exc:
            raise self.refuse("store_error", f"not stored: {exc}") from None
        except Exception as exc:  # sqlite3.Error and friends
            raise self.refuse("store_error", f"not stored: {exc}") from None

    def label_input(self, x: Any, cls: Any, source: str, model: str | None = None) -> int:
        """Store ``x`` with class ``cls``; returns the sample id."""
        self._source(source)
        label = self.class_index(cls)
        checked = self.checked_input(x)
        return self._write(checked, label, source, model or self.model())

    def label_answer(self, answer_id: Any, cls: Any, source: str) -> int:
        """Store the input behind an earlier answer with class ``cls``."""
        self._source(source)
        label = self.class_index(cls)
        seen = self.memory.get(answer_id) if isinstance(answer_id, str) else None
        if seen is None:
            raise self.refuse("unknown_answer", f"no recent answer with id {answer_id!r}")
        return self._write(self.checked_input(seen.x), label, source, seen.model)

    def label_frame(self, sensor: int, seq: int, cls: Any) -> int:
        """Store the input of serial frame (sensor, seq) with class ``cls``."""
        self._source("serial")
        label = self.class_index(cls)
        seen = self.memory.by_frame(sensor, seq)
        if seen is None:
            raise self.refuse("unknown_answer", f"no recent answer to sensor {sensor} "
                                                f"frame {seq}")
        return self._write(self.checked_input(seen.x), label, "serial", seen.model)

    def label_many(self, items: list[Any], source: str) -> dict[str, Any]:
        """A batch from the local API: each item ``{"answer": id, "class": c}`` or
        ``{"input": [...], "class": c}``; returns stored ids and per-item refusals."""
        stored: list[int] = []
        refused: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict) or "class" not in item or \
                        ("answer" in item) == ("input" in item):
                    raise self.refuse("bad_request", 'each label needs "class" and one of '
                                                     '"answer" or "input"')
                if "answer" in item:
                    stored.append(self.label_answer(item["answer"], item["class"], source))
                else:
                    stored.append(self.label_input(item["input"], item["class"], source))
            except LabelRefused as exc:
                refused.append({"index": i, "reason": exc.reason, "message": str(exc)})
        return {"stored": len(stored), "ids": stored, "refused": refused}
