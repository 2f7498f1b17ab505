"""DP-SGD: clipping bounds each example's influence, noise has the stated scale, ε matches."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp

from edgefleet.device.core.errors import UsageError
from edgefleet.device.fl import dp_sgd
from edgefleet.device.fl.dp_sgd import DpSgdConfig, poisson_batch, train_dp_sgd
from edgefleet.device.privacy import accounting as dp_mod
from edgefleet.device.privacy.accounting import (
    SIGMA_CACHE,
    DpEvent,
    epsilon_for,
    noise_for_epsilon,
    noise_for_epsilon_cached,
)
from edgefleet.device.runtime.mlp import MLP


def _materialized(a: list[np.ndarray], d: list[np.ndarray], clip: float) -> list[np.ndarray]:
    """The textbook clipped sum: per-example gradients built, clipped and summed in float64."""
    per = []
    for ai, di in zip(a, d, strict=True):
        per += [np.einsum("ni,nj->nij", ai.astype(np.float64), di.astype(np.float64)),
                di.astype(np.float64)]
    b = len(a[0])
    norms = np.sqrt(sum(np.sum(g.reshape(b, -1) ** 2, axis=1) for g in per))
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return [np.tensordot(scale, g, axes=(0, 0)) for g in per]


def _norms(a: list[np.ndarray], d: list[np.ndarray]) -> np.ndarray:
    return np.sqrt(sum(np.sum(ai.astype(np.float64) ** 2, axis=1) * np.sum(di.astype(
        np.float64) ** 2, axis=1) + np.sum(di.astype(np.float64) ** 2, axis=1)
        for ai, di in zip(a, d, strict=True)))


@pytest.mark.parametrize("widths", [(1280, 10), (64, 16, 10), (7, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipped_sum_equals_materialized_clip_and_sum(widths: tuple[int, ...],
                                                      dtype: type) -> None:
    rng = np.random.default_rng(7)
    b = 12
    a = [rng.normal(0, 1, size=(b, w)).astype(dtype) for w in widths[:-1]]
    d = [rng.normal(0, 0.05, size=(b, w)).astype(dtype) for w in widths[1:]]
    # Rows 0-2: a zero gradient, a zero input (bias gradient only), a zero output gradient
    # in one layer; rows 3-5 scaled so their whole norm is far below C, then far above it.
    for m in d:
        m[0] = 0
    a[0][1] = 0
    d[-1][2] = 0
    for m in d:
        m[3:5] *= 1e-3
        m[5:8] *= 50
    clip = float(_norms(a, d)[9])  # row 9 sits exactly at C
    norms = _norms(a, d)
    assert norms[0] == 0 and norms[3] < clip < norms[5] and norms[9] == clip
    got = dp_sgd.clipped_sum(a, d, clip)
    want = _materialized(a, d, clip)
    rtol = 1e-5 if dtype is np.float32 else 1e-12
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * clip)


@pytest.mark.parametrize("sizes", [(40, 10), (40, 16, 10)])
def test_model_clipped_sum_equals_each_examples_own_gradient_clipped(
        sizes: tuple[int, ...]) -> None:
    """The MLP's dense terms against the gradient of each example computed on its own."""
    rng = np.random.default_rng(8)
    model = MLP.init(sizes, seed=1)
    model.params = [p.astype(np.float64) for p in model.params]
    x = rng.normal(0, 3, size=(9, sizes[0]))
    x[2] = 0
    y = rng.integers(0, sizes[-1], size=9)
    own = [model.loss_and_grad(x[i:i + 1], y[i:i + 1])[1] for i in range(9)]
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in gs)) for gs in own])
    clip = float(np.median(norms))
    want = [sum(min(1.0, clip / n) * gs[k] for gs, n in zip(own, norms, strict=True))
            for k in range(len(model.params))]
    np.testing.assert_allclose(dp_sgd.grad_norms(*model.dense_terms(x, y)), norms, rtol=1e-10)
    got = dp_sgd.clipped_sum(*model.dense_terms(x, y), clip)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_clipping_bounds_each_example_without_noise() -> None:
    rng = np.random.default_rng(0)
    a, d = [rng.normal(0, 10, size=(5, 3))], [rng.normal(0, 10, size=(5, 4))]
    out = dp_sgd.clipped_sum(a, d, clip=1.0)
    # The sum of 5 clipped examples has norm <= 5 * C; each one is scaled to exactly C.
    assert np.sqrt(sum(np.sum(o ** 2) for o in out)) <= 5.0 + 1e-9
    one = dp_sgd.clipped_sum([a[0][:1]], [d[0][:1]], 1.0)
    assert np.sqrt(sum(np.sum(o ** 2) for o in one)) == pytest.approx(1.0, 1e-12)


def test_small_gradients_are_not_scaled() -> None:
    a, d = [np.full((2, 1), 0.1)], [np.full((2, 3), 0.01)]
    out = dp_sgd.clipped_sum(a, d, clip=1.0)
    np.testing.assert_allclose(out[0], np.full((1, 3), 0.002), rtol=1e-12)
    np.testing.assert_allclose(out[1], np.full(3, 0.02), rtol=1e-12)


def test_non_positive_clip_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        dp_sgd.clipped_sum([np.ones((1, 2))], [np.ones((1, 2))], 0.0)
    with pytest.raises(UsageError):
        dp_sgd.add_noise([np.zeros(2)], -1.0, 1.0, 1.0, np.random.default_rng(0))


def test_noise_is_exactly_sigma_times_clip_gaussian_over_expected_batch() -> None:
    summed = [np.zeros((30, 10), np.float32), np.zeros(10, np.float32)]
    out = dp_sgd.add_noise(summed, clip=2.0, sigma=1.5, expected_batch=10.0,
                           rng=np.random.default_rng(2))
    ref = np.random.default_rng(2)
    for o, s in zip(out, summed, strict=True):
        want = (ref.normal(0.0, 1.5 * 2.0, size=s.shape) / 10.0).astype(np.float32)
        assert o.dtype == np.float32
        np.testing.assert_array_equal(o, want)


def test_noise_std_is_sigma_times_clip_over_expected_batch() -> None:
    model = MLP.init((200, 100), seed=0)
    empty = np.zeros((0, 200), np.float32)
    out = dp_sgd.private_gradient(model, empty, np.zeros(0, np.int64), clip=2.0, sigma=1.5,
                                  expected_batch=10.0, rng=np.random.default_rng(2))
    # An empty Poisson batch still releases (pure) noise on every parameter.
    assert [o.shape for o in out] == [p.shape for p in model.params]
    assert np.std(out[0]) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.03)


def test_dp_sgd_step_equals_the_materialized_reference() -> None:
    """The whole step, rng stream included, equals per-example clip, sum, noise, update."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    y = rng.integers(0, 3, size=60)
    cfg = DpSgdConfig(clip=0.5, sigma=1.1, q=0.2, steps=6, lr=0.3)
    model = MLP.init((12, 8, 3), seed=2)
    ref = model.copy()
    train_dp_sgd(model, x, y, cfg, np.random.default_rng(11))
    r = np.random.default_rng(11)
    for _ in range(cfg.steps):
        idx = poisson_batch(r, 60, cfg.q)
        own = [ref.loss_and_grad(x[i:i + 1], y[i:i + 1])[1] for i in idx]
        norms = [np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)) for gs in own]
        for k, p in enumerate(ref.params):
            total = sum((min(1.0, cfg.clip / n) * gs[k].astype(np.float64)
                         for gs, n in zip(own, norms, strict=True)), np.zeros(p.shape))
            noisy = (total + r.normal(0.0, cfg.sigma * cfg.clip, size=p.shape)) / (cfg.q * 60)
            p -= cfg.lr * noisy.astype(np.float32)
    for p, q in zip(model.params, ref.params, strict=True):
        np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-5)


def test_poisson_batch_rate() -> None:
    rng = np.random.default_rng(3)
    sizes = [len(poisson_batch(rng, 1000, 0.05)) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # variable size: Poisson, not fixed-size sampling


def test_epsilon_matches_dp_accounting_directly() -> None:
    ev = DpEvent(q=0.08, sigma=1.1, steps=60)
    acc = rdp.RdpAccountant()
    acc.compose(dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.08, dpa.GaussianDpEvent(1.1)), 60))
    assert epsilon_for([ev], 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_repeated_events_merge_to_the_same_epsilon_as_composing_each() -> None:
    rounds = [DpEvent(0.3, 1.1, 5), DpEvent(0.5, 2.0, 3), DpEvent(0.3, 1.1, 7)]
    acc = rdp.RdpAccountant()
    for ev in rounds:
        acc.compose(dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(ev.q, dpa.GaussianDpEvent(ev.sigma)), ev.steps))
    assert epsilon_for(rounds, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert epsilon_for(rounds[::-1], 1e-5) == epsilon_for(rounds, 1e-5)


def test_noise_for_epsilon_meets_target_from_below() -> None:
    sigma = noise_for_epsilon(3.0, 1e-5, 0.1, 100)
    eps = epsilon_for([DpEvent(0.1, sigma, 100)], 1e-5)
    assert eps <= 3.0
    assert eps > 2.95
    assert epsilon_for([DpEvent(0.1, sigma - 0.01, 100)], 1e-5) > eps


def test_more_steps_cost_more() -> None:
    a = epsilon_for([DpEvent(0.1, 1.0, 10)], 1e-5)
    b = epsilon_for([DpEvent(0.1, 1.0, 10), DpEvent(0.1, 1.0, 10)], 1e-5)
    assert b > a


@pytest.mark.parametrize("bad", [dict(q=0.0, sigma=1.0, steps=1), dict(q=0.5, sigma=0.0, steps=1),
                                 dict(q=1.5, sigma=1.0, steps=1), dict(q=0.5, sigma=1.0, steps=-1)])
def test_bad_events_are_usage_errors(bad: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        DpEvent(**bad)  # type: ignore[arg-type]


def test_dp_sgd_learns_with_moderate_noise() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = MLP.init((8, 16, 2), seed=0)
    before = model.accuracy(x, y)
    ev = train_dp_sgd(model, x, y, DpSgdConfig(clip=1.0, sigma=0.8, q=0.1, steps=150, lr=0.5),
                      rng)
    assert ev == DpEvent(0.1, 0.8, 150)
    assert model.accuracy(x, y) > max(before, 0.8)


# σ cache: (ε, δ, q, steps) of a 3-round run of 20 steps, as a device calibrates it.
CAL = (3.0, 1e-5, 32 / 230, 60)


@pytest.fixture
def calibrations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, float, int]]:
    """Every call that really calibrates σ (the cache must not, on a hit)."""
    calls: list[tuple[float, float, float, int]] = []
    real = noise_for_epsilon

    def spy(eps: float, delta: float, q: float, steps: int, *accountant: Any) -> float:
        calls.append((eps, delta, q, steps))
        return real(eps, delta, q, steps, *accountant)

    monkeypatch.setattr(dp_mod, "noise_for_epsilon", spy)
    return calls


@pytest.mark.slow
def test_sigma_cache_hit_gives_the_freshly_calibrated_sigma(
        tmp_path: Path, calibrations: list[tuple[float, float, float, int]]) -> None:
    first = noise_for_epsilon_cached(tmp_path, *CAL)
    assert calibrations == [CAL] and (tmp_path / SIGMA_CACHE).is_file()
    again = noise_for_epsilon_cached(tmp_path, *CAL)
    assert calibrations == [CAL]  # read from the state folder, not recalibrated
    fresh = noise_for_epsilon.__wrapped__(*CAL)  # bypasses the in-process lru_cache too
    assert first == again == fresh
    assert epsilon_for([DpEvent(CAL[2], again, CAL[3])], CAL[1]) <= CAL[0]
    # Another key (more steps) is a miss with its own σ, and both stay cached.
    other = noise_for_epsilon_cached(tmp_path, 3.0, 1e-5, CAL[2], 80)
    assert other > first and len(calibrations) == 2
    assert noise_for_epsilon_cached(tmp_path, *CAL) == first and len(calibrations) == 2


def _garbage(_: bytes) -> bytes:
    return b"\x00\xffnot json"


def _truncated(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _sigma_edited(b: bytes) -> bytes:  # valid JSON, σ changed without its checksum
    doc = json.loads(b)
    doc["entries"][0]["sigma"] = 50.0  # more noise: only the checksum can tell
    return json.dumps(doc).encode()


def _other_schema(b: bytes) -> bytes:
    return json.dumps({**json.loads(b), "schema": 99}).encode()


@pytest.mark.parametrize("damage", [_garbage, _truncated, _sigma_edited, _other_schema,
                                    lambda _: b""])
def test_damaged_sigma_cache_is_recalibrated_not_an_error(
        tmp_path: Path, calibrations: list[tuple[float, float, float, int]],
        damage: Callable[[bytes], bytes]) -> None:
    expected = noise_for_epsilon_cached(tmp_path, *CAL)
    path = tmp_path / SIGMA_CACHE
    path.write_bytes(damage(path.read_bytes()))
    assert noise_for_epsilon_cached(tmp_path, *CAL) == expected
    assert calibrations == [CAL, CAL]
    assert noise_for_epsilon_cached(tmp_path, *CAL) == expected  # rewritten: a hit again
    assert calibrations == [CAL, CAL]


def test_sigma_cache_never_spends_more_than_the_target(
        tmp_path: Path, calibrations: list[tuple[float, float, float, int]]) -> None:
    """An entry with a valid checksum but too little noise (forged) is recalibrated."""
    expected = noise_for_epsilon_cached(tmp_path, *CAL)
    path = tmp_path / SIGMA_CACHE
    doc = json.loads(path.read_text())
    key = doc["entries"][0]["key"]
    doc["entries"][0].update(sigma=0.9, sha256=dp_mod._entry_digest(key, 0.9))
    path.write_text(json.dumps(doc))
    assert epsilon_for([DpEvent(CAL[2], 0.9, CAL[3])], CAL[1]) > CAL[0]
    assert noise_for_epsilon_cached(tmp_path, *CAL) == expected
    assert len(calibrations) == 2


@pytest.mark.slow
def test_accounting_loads_only_the_rdp_part_of_dp_accounting() -> None:
    """A fresh process accounts ε with RDP without the PLD accountant and calibration
    (SciPy signal/optimize); importing the package afterwards still gives all of it."""
    code = """
import sys
from edgefleet.device.privacy.accounting import DpEvent, epsilon_for
eps = epsilon_for([DpEvent(0.08, 1.1, 60)], 1e-5, "rdp")
heavy = [m for m in ("dp_accounting.pld", "dp_accounting.mechanism_calibration",
                     "scipy.optimize", "scipy.signal") if m in sys.modules]
import dp_accounting as dpa
from dp_accounting import rdp
acc = rdp.RdpAccountant()
acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(0.08, dpa.GaussianDpEvent(1.1)), 60))
print(heavy, eps == acc.get_epsilon(1e-5), callable(dpa.calibrate_dp_mechanism))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert res.stdout.split("\n")[0] == "[] True True"
