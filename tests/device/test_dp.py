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
from edgefleet.device.fl.dp_sgd import DpSgdConfig, clip_and_noise, poisson_batch, train_dp_sgd
from edgefleet.device.privacy import accounting as dp_mod
from edgefleet.device.privacy.accounting import (
    SIGMA_CACHE,
    DpEvent,
    epsilon_for,
    noise_for_epsilon,
    noise_for_epsilon_cached,
)
from edgefleet.device.runtime.mlp import MLP


def test_clipping_bounds_each_example_without_noise() -> None:
    rng = np.random.default_rng(0)
    per_ex = [rng.normal(0, 10, size=(5, 3, 4)), rng.normal(0, 10, size=(5, 4))]
    out = clip_and_noise(per_ex, clip=1.0, sigma=1e-12, expected_batch=1.0, rng=rng)
    # The sum of 5 clipped examples has norm <= 5 * C; each one is scaled to exactly C.
    total = np.sqrt(sum(np.sum(o.astype(np.float64) ** 2) for o in out))
    assert total <= 5.0 + 1e-6
    one = clip_and_noise([g[:1] for g in per_ex], 1.0, 1e-12, 1.0, rng)
    assert np.sqrt(sum(np.sum(o.astype(np.float64) ** 2) for o in one)) == pytest.approx(1.0, 1e-5)


def test_small_gradients_are_not_scaled() -> None:
    rng = np.random.default_rng(1)
    per_ex = [np.full((2, 3), 0.01)]
    out = clip_and_noise(per_ex, clip=1.0, sigma=1e-12, expected_batch=2.0, rng=rng)
    np.testing.assert_allclose(out[0], np.full(3, 0.01), rtol=1e-6)


def test_noise_std_is_sigma_times_clip_over_expected_batch() -> None:
    rng = np.random.default_rng(2)
    empty = [np.zeros((0, 20000))]
    out = clip_and_noise(empty, clip=2.0, sigma=1.5, expected_batch=10.0, rng=rng)
    assert np.std(out[0]) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.03)


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
