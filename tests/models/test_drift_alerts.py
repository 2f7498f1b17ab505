"""Drift alerts an operator can trust: a real package, the sensor simulator's stream, the
agent's monitor and the server's rule. No drift must never alert; a shifted sensor must.

Regression of issue 18 item 5: a federated package (pretrained on the calibration split,
temperature fitted there) used to carry reference confidences measured on that split,
nearly all exactly 1.0, and every clean device alerted with confidence PSI ~0.47.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.device.agent.settings import TelemetrySection
from edgefleet.device.inference.drift import DriftMonitor
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.pipeline import BuildOptions, build_package, package_model
from edgefleet.models.sim.sensor_sim import samples
from edgefleet.models.sim.shift import Shift
from edgefleet.server.fl.settings import RunSettings
from edgefleet.server.telemetry.alerts import AlertThresholds, drift_verdict

WINDOW = TelemetrySection().drift_window
THRESHOLD = AlertThresholds().drift_psi
#: The retraining e2e's shift (tests/e2e/test_retrain_e2e.py).
SHIFT = "intensity=0.5,noise=1"


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Predictor]:
    """``models build``'s package and a federated run's (pretrained on the calibration
    split, as RunSettings.initial_model makes it), ONNX only."""
    from edgefleet.models.core.tasks import get_task

    root = tmp_path_factory.mktemp("drift")
    built = build_package(BuildOptions(task="digits", out=root / "built", formats="onnx",
                                       seed=0))
    _task, norm, model = RunSettings(task="digits", pretrain_epochs=20, seed=0).initial_model()
    fed = package_model(get_task("digits"), model, norm, root / "fl", formats="onnx",
                        name="digits-fl")
    return {"built": Predictor.load(built.path, threads=1),
            "federated": Predictor.load(fed.path, threads=1)}


def _alerts(pred: Predictor, shift: str, seed: int, every: int = 20) -> list[bool]:
    """One window of the simulator's stream through the agent's path; the server's
    verdict at each report (every ``every`` frames, 1 s at the demo's rate)."""
    assert pred.manifest.reference_stats is not None
    mon = DriftMonitor(pred.manifest.reference_stats, WINDOW)
    stream = samples("digits", seed, "features", Shift.parse(shift, "digits"))
    out = []
    for i in range(1, WINDOW + 1):
        _ptype, data, _label = next(stream)
        x = np.frombuffer(data, dtype="<u1").astype(np.float32)
        mon.observe(x, pred.predict(x).confidence)
        if i % every == 0:
            v = drift_verdict(mon.scores(), THRESHOLD)
            out.append(v is not None and v.firing)
    return out


@pytest.mark.parametrize("kind", ["built", "federated"])
def test_no_drift_no_alert_over_50_seeds(packages: dict[str, Predictor], kind: str) -> None:
    fired = {seed: sum(_alerts(packages[kind], "", seed)) for seed in range(50)}
    assert not any(fired.values()), {k: v for k, v in fired.items() if v}


@pytest.mark.parametrize("kind", ["built", "federated"])
def test_shifted_sensor_alerts(packages: dict[str, Predictor], kind: str) -> None:
    for seed in range(10):
        verdicts = _alerts(packages[kind], SHIFT, seed)
        assert verdicts[-1], (kind, seed)  # at full window
        assert verdicts.index(True) <= 5, verdicts  # within 100 frames of scores


def test_reference_confidences_are_held_out(packages: dict[str, Predictor]) -> None:
    """The federated package's reference is not the degenerate calibration one: several
    bins, measured on the 359 held-out test samples."""
    ref = packages["federated"].manifest.reference_stats
    assert ref is not None
    conf = ref["confidence"]
    assert conf["samples"] == 359 and len(conf["probs"]) >= 2
    assert max(conf["probs"]) < 0.995
