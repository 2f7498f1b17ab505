"""Dirichlet partitioner, task splits, temperature scaling and ECE."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.models.core.calibration import expected_calibration_error, fit_temperature, nll
from edgefleet.models.core.partition import dirichlet_partition
from edgefleet.models.core.tasks import get_task


def test_partition_is_disjoint_complete_and_deterministic() -> None:
    y = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(y, 7, alpha=0.5, seed=3)
    again = dirichlet_partition(y, 7, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 10


def test_small_alpha_skews_labels() -> None:
    y = np.repeat(np.arange(10), 100)
    skewed = dirichlet_partition(y, 5, alpha=0.1, seed=0)
    even = dirichlet_partition(y, 5, alpha=100.0, seed=0)

    def top_share(parts: list[np.ndarray]) -> float:
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    assert top_share(skewed) > 0.3 > top_share(even)


def test_digits_split_is_fixed_and_disjoint() -> None:
    task = get_task("digits")
    a, b = task.split(), task.split()
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert len(a.y_test) + len(a.y_train) + len(a.y_calib) == 1797
    assert set(np.unique(a.y_test)) == set(range(10))


def test_unknown_task_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        get_task("nope")


def test_temperature_scaling_fixes_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n, k = 2000, 5
    true_logits = rng.normal(scale=2.0, size=(n, k))
    p = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])  # labels drawn from the true model
    over = true_logits * 4.0  # an overconfident model: same argmax, logits ×4
    t = fit_temperature(over, y)
    assert 3.0 < t < 5.5
    assert nll(over, y, t) < nll(over, y, 1.0)
    from edgefleet.device.runtime.mlp import softmax

    assert expected_calibration_error(softmax(over, t), y) < expected_calibration_error(
        softmax(over), y
    )
