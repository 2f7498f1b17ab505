"""The one-run audit: its statistics, and ``edgefleet privacy audit --json`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.server.cli import app
from edgefleet.server.privacy.audit import epsilon_lower_bound, guesses


def test_lower_bound_statistics() -> None:
    # Chance-level guessing proves nothing; perfect guessing is limited by m.
    assert epsilon_lower_bound(200, 100, 50, 1e-5, 0.05) == 0.0
    perfect = epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.05)
    q = 0.05 ** (1 / 1000)  # all 1000 right: P[Bin(1000, q) = 1000] = 0.05
    assert perfect == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
    # More correct guesses, more ε; a δ term makes the bound more cautious.
    assert epsilon_lower_bound(200, 100, 90, 0, 0.05) > epsilon_lower_bound(200, 100, 80, 0, 0.05)
    assert epsilon_lower_bound(200, 100, 90, 1e-3, 0.05) < epsilon_lower_bound(200, 100, 90, 0,
                                                                                 0.05)


def test_lower_bound_is_valid_for_randomized_response() -> None:
    """ε-DP randomized response on m bits: the bound exceeds ε in at most ~5 % of trials."""
    rng = np.random.default_rng(0)
    eps, m, over = 1.0, 400, 0
    for _ in range(200):
        bits = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        out = np.where(keep, bits, ~bits)
        r, v = guesses(out.astype(float) + rng.random(m) * 1e-3, bits, m // 2)
        over += epsilon_lower_bound(m, r, v, 0.0, 0.05) > eps
    assert over <= 0.05 * 200 + 6


@pytest.mark.timeout(600)
def test_audit_cli_json_on_digits_finds_leakage_without_dp() -> None:
    res = CliRunner().invoke(app, ["privacy", "audit", "--task", "digits", "--dp", "off",
                                   "--canaries", "100", "--rounds", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["dp"] == "off" and out["accounted_epsilon"] is None
    assert out["canaries"] == 100 and out["guesses"] > 0
    assert out["empirical_epsilon"] > 1.0  # memorized canaries are found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_audit_with_dp_stays_below_the_accounted_epsilon() -> None:
    res = CliRunner().invoke(app, ["privacy", "audit", "--task", "digits", "--dp", "sample",
                                   "--epsilon", "3", "--canaries", "100", "--rounds", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert 2.5 < out["accounted_epsilon"] <= 3.0
    assert out["empirical_epsilon"] <= out["accounted_epsilon"]
