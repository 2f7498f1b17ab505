"""Issue 16 through the real fleet: a user's Keras CNN, imported, served and fine-tuned.

`edgefleet models import` packages the worked example's Keras CNN; `registry push` and
`rollout --fleet` (director-signed) put it on agents enrolled under `server up` and
running `edgefleet-agent run`, one of them pinned to the LiteRT variant; they answer
8x8x1 images on their local API exactly as the package does here. Its head is then
fine-tuned with DP by the real ServerApp and ClientApp on shifted devices (in-process
grid: the deployment engine runs the same ClientApp in tests/e2e/test_fl_*), and the
new version, with its rebuilt TFLite variant, goes out the usual way: a canary on one
agent, then `rollout promote`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.agent.local_api import request
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.sim.head_fleet import FIELD_SHIFTS, make_data, make_fleet
from edgefleet.server.demo.cnn import run_head_fl
from tests.conftest import run_cli
from tests.support.byom import make_keras_model
from tests.support.fleet_server import reachable_broker_dir  # noqa: F401
from tests.support.server_up import Fleet

pytestmark = [pytest.mark.usefixtures("reachable_broker_dir"), pytest.mark.slow,
              pytest.mark.e2e, pytest.mark.timeout(900)]


def _labels(pkg: Path, variant: str, x: np.ndarray) -> list[int]:
    p = Predictor.load(pkg, variant=variant, threads=1)
    return [q.label for q in p.predict_batch(x)]


def _answers(fleet: Fleet, name: str, x: np.ndarray) -> list[int]:
    reply: dict[str, Any] = request(fleet.sock(name), {"id": 1, "input": x.tolist()},
                                    timeout=20)
    assert "predictions" in reply, reply
    return [p["label"] for p in reply["predictions"]]


def test_an_imported_cnn_is_served_fine_tuned_and_canaried_on_real_agents(
        tmp_path: Path) -> None:
    data = make_data(tmp_path)
    model = make_keras_model(data)
    pkg = tmp_path / "pkg" / "cnn"
    imp = run_cli("models", "import", str(model), "--calibration", str(data["calib"]),
                  "--eval", str(data["eval"]), "--labels", str(data["labels"]),
                  "--scale", "1/16", "--out", str(pkg), timeout=600)
    assert imp.returncode == 0, imp.stdout + imp.stderr
    m = load_package(pkg)
    assert (m.name, m.version) == ("cnn", "1.0.0")
    assert {"onnx-int8", "tflite-int8"} <= set(m.variants)
    x = data["x_eval"][:24]  # (24, 8, 8, 1) images, 0..16, as the input spec says

    (tmp_path / "fleet").mkdir()
    fleet = Fleet(tmp_path / "fleet", pkg)
    try:
        fleet.enroll("pi-01")
        fleet.enroll("pi-02", overrides={"model": {"variant": "tflite-int8"}})
        out = fleet.cli("registry", "push", str(pkg))
        assert out["version"] == "1.0.0"
        fleet.cli("rollout", "cnn@1.0.0", "--fleet")
        fleet.wait(lambda: fleet.version("pi-01") == fleet.version("pi-02") == "1.0.0",
                   "both agents on cnn 1.0.0")
        assert _answers(fleet, "pi-01", x) == _labels(pkg, "onnx-int8", x)
        assert _answers(fleet, "pi-02", x) == _labels(pkg, "tflite-int8", x)
        assert np.mean(np.array(_answers(fleet, "pi-01", x)) == data["y_eval"][:24]) >= 0.75

        # Devices whose cameras moved fine-tune the head with DP; the server writes it back.
        sim = make_fleet(data, pkg, tmp_path / "sim", FIELD_SHIFTS, records=400)
        ft = tmp_path / "pkg-ft" / "cnn"
        run_head_fl(sim, {"tag": "cnn-head", "num-rounds": 2, "dp": "sample",
                          "epsilon": 3.0, "delta": 1e-5, "local-steps": 20,
                          "batch-size": 64, "lr": 0.5, "clip": 1.0, "strategy": "fedavg",
                          "db": str(tmp_path / "fl.db"), "out": str(ft)},
                    noise_seed=0, budget=10.0, max_run_epsilon=3.0)
        tuned = load_package(ft)
        assert tuned.version == "1.0.1" and tuned.lineage["fine_tuned"]["tflite"]["rebuilt"]
        assert fleet.cli("registry", "push", str(ft))["version"] == "1.0.1"

        fleet.cli("rollout", "cnn@1.0.1", "--devices", "pi-02")  # canary: the LiteRT agent
        fleet.wait(lambda: fleet.version("pi-02") == "1.0.1", "pi-02 on the canary 1.0.1")
        assert fleet.version("pi-01") == "1.0.0"
        assert _answers(fleet, "pi-02", x) == _labels(ft, "tflite-int8", x)
        fleet.cli("promote", "cnn")
        fleet.wait(lambda: fleet.version("pi-01") == "1.0.1", "pi-01 on 1.0.1 after promote")
        assert _answers(fleet, "pi-01", x) == _labels(ft, "onnx-int8", x)
        fleet.wait(lambda: fleet.counters("pi-01").get("update_activated", 0) == 2,
                   "pi-01's telemetry counting both activations")
    finally:
        fleet.close()
