"""RDP and PLD against each other and against an independent numerical computation.

The grid covers small and large sampling rates, noise below and above 1, and few and
many steps. PLD's pessimistic estimate (grid :data:`PLD_DISCRETIZATION`) must never be
below the true ε: it is checked against dp-accounting's optimistic PLD estimate (a lower
estimate from the same distribution) and against ``tests/support/pld_numeric.py``, which
shares no code with dp-accounting. RDP, a looser bound, must be at or above PLD.
"""

from __future__ import annotations

import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.privacy.accounting import (
    DEFAULT_ACCOUNTANT,
    PLD_DISCRETIZATION,
    DpEvent,
    _dpa,
    epsilon_for,
    noise_for_epsilon,
)
from tests.support.pld_numeric import numeric_epsilon

GRID = [  # (q, sigma, steps)
    (0.01, 1.0, 300), (0.05, 0.8, 100), (0.1, 1.0, 100), (0.2, 1.2, 30),
    (0.45, 1.5, 45), (0.45, 3.0, 20), (1.0, 2.0, 10), (0.1, 4.0, 200),
]
DELTA = 1e-5
#: The numerical estimate rounds each step's loss to the nearest grid value; over many
#: steps that blurs the distribution and overstates ε by up to ~0.2 %.
NUMERIC_REL_TOL = 3e-3


def _optimistic_pld(q: float, sigma: float, steps: int) -> float:
    pld = _dpa("pld.privacy_loss_distribution").from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, pessimistic_estimate=False,
        value_discretization_interval=PLD_DISCRETIZATION).self_compose(steps)
    return float(pld.get_epsilon_for_delta(DELTA))


@pytest.mark.parametrize(("q", "sigma", "steps"), GRID)
def test_pld_is_tighter_than_rdp_and_never_below_the_true_epsilon(
        q: float, sigma: float, steps: int) -> None:
    ev = [DpEvent(q, sigma, steps)]
    rdp, pld = epsilon_for(ev, DELTA, "rdp"), epsilon_for(ev, DELTA, "pld")
    numeric = numeric_epsilon(q, sigma, steps, DELTA)
    lower = _optimistic_pld(q, sigma, steps)
    assert pld <= rdp
    assert lower <= pld
    assert pld >= numeric * (1 - NUMERIC_REL_TOL)
    assert numeric <= rdp
    # Tight: PLD is within 1 % of the independent figure, RDP gives away more.
    assert pld <= numeric * 1.01
    assert rdp >= pld * 1.02


def test_default_accountant_is_the_cross_checked_pld() -> None:
    assert DEFAULT_ACCOUNTANT == "pld"
    ev = [DpEvent(0.1, 1.0, 100)]
    assert epsilon_for(ev, DELTA) == epsilon_for(ev, DELTA, "pld")


def test_pld_composes_a_ledger_like_one_mechanism_with_summed_steps() -> None:
    rounds = [DpEvent(0.3, 1.1, 5), DpEvent(0.5, 2.0, 3), DpEvent(0.3, 1.1, 7)]
    acc = _dpa("pld.pld_privacy_accountant").PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
    for ev in rounds:
        acc.compose(ev.to_accounting())
    assert epsilon_for(rounds, DELTA, "pld") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-6)
    assert epsilon_for(rounds[::-1], DELTA, "pld") == epsilon_for(rounds, DELTA, "pld")
    assert epsilon_for([DpEvent(0.3, 1.1, 0)], DELTA, "pld") == 0.0


def test_pld_calibration_buys_less_noise_for_the_same_budget() -> None:
    s_pld = noise_for_epsilon(3.0, DELTA, 0.1, 100, "pld")
    s_rdp = noise_for_epsilon(3.0, DELTA, 0.1, 100, "rdp")
    assert s_pld < s_rdp
    eps = epsilon_for([DpEvent(0.1, s_pld, 100)], DELTA, "pld")
    assert 2.95 < eps <= 3.0
    assert numeric_epsilon(0.1, s_pld, 100, DELTA) <= 3.0 * (1 + NUMERIC_REL_TOL)


def test_unknown_accountant_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="accountant"):
        epsilon_for([DpEvent(0.1, 1.0, 1)], DELTA, "prv")  # type: ignore[arg-type]
