"""Bring-your-own-model fixtures, built once per test worker (tests/support/byom.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet.models.build.importer import import_model
from tests.support.byom import import_opts, make_data, make_keras_model, make_mlp_onnx


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Digits as 8x8x1 images: train / calibration / evaluation rows and their files."""
    return make_data(tmp_path_factory.mktemp("import-data"))


@pytest.fixture(scope="session")
def mlp_onnx(data: dict[str, Any]) -> Path:
    """A trained digits MLP written by the project's own ONNX export (flat 64 inputs)."""
    return make_mlp_onnx(data)


@pytest.fixture(scope="session")
def keras_model(data: dict[str, Any]) -> Path:
    """A tiny Keras CNN trained on the digits, saved as .keras."""
    return make_keras_model(data)


@pytest.fixture(scope="session")
def keras_pkg(data: dict[str, Any], keras_model: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CNN imported into a package."""
    out = tmp_path_factory.mktemp("keras-pkg") / "cnn"
    import_model(import_opts(data, keras_model, out))
    return out
