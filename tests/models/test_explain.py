"""Integrated gradients: completeness, agreement with finite differences, the CLI and its PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.mlp import MLP
from edgefleet.models.core.explain import explain, input_gradient
from edgefleet.models.core.tasks import get_task
from tests.conftest import run_cli


def test_input_gradient_matches_finite_differences() -> None:
    model = MLP.init((6, 9, 7, 3), seed=4)
    x = np.random.default_rng(1).normal(size=(2, 6))
    g = input_gradient(model, x, target=1)
    m64 = MLP(model.sizes, [p.astype(np.float64) for p in model.params])
    eps = 1e-6
    for j in range(6):
        d = np.zeros(6)
        d[j] = eps
        num = (m64.forward(x + d)[:, 1] - m64.forward(x - d)[:, 1]) / (2 * eps)
        np.testing.assert_allclose(g[:, j], num, rtol=1e-4, atol=1e-6)


def test_attributions_are_complete() -> None:
    model = MLP.init((10, 16, 4), seed=2)
    x = np.random.default_rng(3).normal(size=10)
    ex = explain(model, x, steps=256)
    assert ex.completeness_gap < 1e-2 * max(1.0, abs(ex.logit - ex.baseline_logit))
    assert ex.attributions.shape == (10,)


@pytest.mark.slow
def test_explain_cli_on_digits(digits_package: Path, tmp_path: Path) -> None:
    split = get_task("digits").split()
    np.save(tmp_path / "x.npy", split.x_test[:3])
    png = tmp_path / "why.png"
    proc = run_cli("explain", str(digits_package), "--input", str(tmp_path / "x.npy"),
                   "--row", "1", "--png", str(png), "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    total = sum(res["attributions"].values())
    assert abs(total - (res["logit"] - res["baseline_logit"])) < 0.05 * max(
        1.0, abs(res["logit"] - res["baseline_logit"]))
    assert res["label"] == str(res["target"]) and len(res["attributions"]) == 64
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("explain", str(digits_package), "--input", str(tmp_path / "missing.npy"))
    assert bad.returncode == 64 and "cannot read" in bad.stderr
