"""Built packages carry reference statistics that a device can score drift against."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.runtime.manifest import load_package
from edgefleet.models.core.tasks import get_task


@pytest.mark.slow
def test_package_has_reference_stats(digits_package: Path) -> None:
    m = load_package(digits_package)
    assert m.reference_stats is not None
    assert len(m.reference_stats["features"]["edges"]) == m.input.shape[0]
    assert m.reference_stats["confidence"]["probs"]
    mon = DriftMonitor.from_manifest(m, window=200)
    assert mon is not None
    split = get_task("digits").split()
    mon.observe(split.x_test[:200])
    score = mon.scores()["input_psi"]
    assert score is not None and score < 0.1
