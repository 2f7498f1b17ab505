"""The NumPy MLP: gradients against finite differences, per-example gradient terms, determinism."""

from __future__ import annotations

import numpy as np

from edgefleet.device.runtime.mlp import MLP, softmax
from edgefleet.models.core.train import TrainConfig, train_sgd


def _data(n: int = 12, d: int = 5, k: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, k, size=n)


def test_gradients_match_finite_differences() -> None:
    x, y = _data()
    model = MLP.init((5, 7, 6, 4), seed=3)
    model.params = [p.astype(np.float64) for p in model.params]  # type: ignore[misc]
    _, grads = model.loss_and_grad(x.astype(np.float64), y)
    eps = 1e-5
    rng = np.random.default_rng(0)
    for p, g in zip(model.params, grads, strict=True):
        for _ in range(6):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            old = p[idx]
            p[idx] = old + eps
            up = model.loss(x.astype(np.float64), y)
            p[idx] = old - eps
            down = model.loss(x.astype(np.float64), y)
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - g[idx]) < 1e-3 + 1e-2 * abs(numeric), (idx, numeric, g[idx])


def test_dense_terms_give_each_examples_own_gradient() -> None:
    x, y = _data(n=9)
    model = MLP.init((5, 8, 4), seed=2)
    acts, deltas = model.dense_terms(x, y)
    assert [a.shape for a in acts] == [(9, 5), (9, 8)]
    assert [d.shape for d in deltas] == [(9, 8), (9, 4)]
    for i in range(9):
        _, own = model.loss_and_grad(x[i:i + 1], y[i:i + 1])
        for k, (a, d) in enumerate(zip(acts, deltas, strict=True)):
            np.testing.assert_allclose(np.outer(a[i], d[i]), own[2 * k], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(d[i], own[2 * k + 1], rtol=1e-4, atol=1e-6)


def test_training_is_deterministic_and_learns() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    cfg = TrainConfig(epochs=15, lr=0.1, seed=5)
    a = train_sgd(MLP.init((4, 8, 2), seed=1), x, y, cfg)
    b = train_sgd(MLP.init((4, 8, 2), seed=1), x, y, cfg)
    for pa, pb in zip(a.params, b.params, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert a.accuracy(x, y) > 0.9


def test_from_params_checks_shapes() -> None:
    m = MLP.init((3, 4, 2))
    assert MLP.from_params(m.params).sizes == (3, 4, 2)
    bad = [m.params[0], m.params[1], m.params[2].T, m.params[3]]
    try:
        MLP.from_params(bad)
    except ValueError:
        pass
    else:
        raise AssertionError("inconsistent shapes accepted")


def test_softmax_rows_sum_to_one() -> None:
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]), temperature=2.0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert p[1, 0] == p[1, 1]
