"""Shared fixtures: a built digits package (once per test worker) and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BIN = Path(sys.executable).parent


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            program: str = "edgefleet") -> subprocess.CompletedProcess[str]:
    """Run one of our console scripts as a user would, capturing its output."""
    return subprocess.run([str(BIN / program), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits package with every variant (ONNX fp32/int8, TFLite int8), built once."""
    from edgefleet.models.build.pipeline import BuildOptions, build_package

    out = tmp_path_factory.mktemp("pkg") / "digits"
    build_package(BuildOptions(task="digits", out=out, formats="all", seed=0))
    return out


@pytest.fixture
def mosquitto(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real mosquitto on a free loopback port, stopped after the test."""
    from edgefleet.server.fleet.broker import MosquittoBroker

    broker = MosquittoBroker(tmp_path / "broker").start()
    yield broker
    broker.kill()
