"""Tasks: a data set, its labels and a fixed, deterministic train/calibration/test split.

``digits`` is scikit-learn's handwritten digits (8x8 images, 10 classes), real data
that ships inside the scikit-learn wheel, so nothing is downloaded. Other tasks
register themselves with :func:`register_task`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import MissingExtraError, UsageError

__all__ = ["Split", "Task", "get_task", "register_task", "stratified_split", "task_names"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Arrays of one task, split once with a fixed seed so every run sees the same test set."""

    x_train: F32
    y_train: I64
    x_calib: F32
    y_calib: I64
    x_test: F32
    y_test: I64


@dataclass(frozen=True)
class Task:
    """A named data set with its label names and value range."""

    name: str
    labels: tuple[str, ...]
    n_features: int
    loader: Callable[[], tuple[F32, I64]] = field(repr=False)
    min_value: float | None = None
    max_value: float | None = None
    default_hidden: tuple[int, ...] = (64,)
    #: Names for explanations and reports (default: x0, x1, ...).
    feature_names: tuple[str, ...] | None = None
    test_fraction: float = 0.2
    calib_fraction: float = 0.15
    #: More held-out samples from the same source (generated tasks), disjoint from train
    #: and test by construction. Only choices that *evaluate* on calibration data use them
    #: (the cascade's τ, see :meth:`calib_pool`); temperature, FL and the split do not.
    extra_calib: Callable[[], tuple[F32, I64]] | None = field(default=None, repr=False)

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.labels)

    def load(self) -> tuple[F32, I64]:
        """All samples and labels (cached per process)."""
        return _cached_load(self.name)

    def split(self) -> Split:
        """The fixed split: test first (held out forever), calibration from the rest."""
        x, y = self.load()
        rest, test = stratified_split(y, self.test_fraction, seed=20240611)
        tr, cal = stratified_split(y[rest], self.calib_fraction, seed=20240612)
        train, calib = rest[tr], rest[cal]
        return Split(x[train], y[train], x[calib], y[calib], x[test], y[test])

    def calib_pool(self) -> tuple[F32, I64]:
        """The calibration split plus :attr:`extra_calib` (if any): more samples for τ."""
        split = self.split()
        if self.extra_calib is None:
            return split.x_calib, split.y_calib
        x, y = _cached_extra(self.name)
        return np.concatenate([split.x_calib, x]), np.concatenate([split.y_calib, y])


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make a task available by name to the pipeline and the CLI."""
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    """Names of the registered tasks."""
    _ensure_builtin()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is a :class:`UsageError` listing the known ones."""
    _ensure_builtin()
    try:
        return _TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r} (known: {', '.join(sorted(_TASKS))})") from None


@cache
def _cached_load(name: str) -> tuple[F32, I64]:
    x, y = _TASKS[name].loader()
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


@cache
def _cached_extra(name: str) -> tuple[F32, I64]:
    loader = _TASKS[name].extra_calib
    assert loader is not None
    x, y = loader()
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)


def stratified_split(
    y: npt.NDArray[np.integer], fraction: float, seed: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices (keep, take) with ``fraction`` of every class in ``take``; deterministic."""
    rng = np.random.default_rng(seed)
    keep: list[npt.NDArray[np.intp]] = []
    take: list[npt.NDArray[np.intp]] = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        k = round(len(idx) * fraction)
        take.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def _load_digits() -> tuple[F32, I64]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingExtraError("the digits task", "models", "scikit-learn") from None
    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def _ensure_builtin() -> None:
    if "digits" not in _TASKS:
        register_task(
            Task(
                name="digits",
                labels=tuple(str(i) for i in range(10)),
                n_features=64,
                loader=_load_digits,
                min_value=0.0,
                max_value=16.0,
                default_hidden=(64,),
                feature_names=tuple(f"pixel[{r},{c}]" for r in range(8) for c in range(8)),
            )
        )
    # Tasks defined in their own modules register on import.
    with contextlib.suppress(ImportError):
        importlib.import_module("edgefleet.models.core.vibration")
