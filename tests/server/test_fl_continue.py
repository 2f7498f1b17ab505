"""A run that continues a registered model starts from its weights, not from scratch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.mlp import MLP, write_params
from edgefleet.server.fl.settings import run_settings


def test_initial_params_are_the_runs_starting_weights(tmp_path: Path) -> None:
    parent = MLP.init((64, 32, 10), seed=7)
    write_params(tmp_path / "params.npz", parent.params)
    s = run_settings({"task": "digits", "initial-params": str(tmp_path / "params.npz"),
                      "pretrain-epochs": 3, "hidden": "64"})
    _, _, model = s.initial_model()
    assert model.sizes == (64, 32, 10)  # the parent's shape, not --hidden
    for got, want in zip(model.params, parent.params, strict=True):
        np.testing.assert_array_equal(got, want)  # and no pretraining on top
    scratch = run_settings({"task": "digits"}).initial_model()[2]
    assert not np.array_equal(scratch.params[0], parent.params[0])


def test_a_parent_of_another_shape_is_refused(tmp_path: Path) -> None:
    write_params(tmp_path / "params.npz", MLP.init((12, 8, 3), seed=0).params)
    s = run_settings({"task": "digits", "initial-params": str(tmp_path / "params.npz")})
    with pytest.raises(UsageError, match="not one for digits"):
        s.initial_model()
    s = run_settings({"task": "digits", "initial-params": str(tmp_path / "missing.npz")})
    with pytest.raises(UsageError, match="cannot start from"):
        s.initial_model()
