"""The cloud ensemble and the choice of τ: exact ensembling, the rule, the CLI, the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.mlp import MLP
from edgefleet.models.build.cloud import ensemble_as_mlp
from edgefleet.models.core.cascade import (
    CHUNK,
    Scores,
    cascade_curve,
    choose_threshold,
    score_samples,
)
from tests.conftest import run_cli
from tests.support import cascade as support

device_pkg = support.device_pkg
cloud_pkg = support.cloud_pkg


@pytest.mark.parametrize("sizes", [(8, 5, 3), (8, 6, 4, 3), (8, 3)])
def test_ensemble_is_exactly_the_mean_of_its_members(sizes: tuple[int, ...]) -> None:
    members = [MLP.init(sizes, seed=s) for s in range(4)]
    for m in members:  # non-zero biases, so their handling is tested too
        for p in m.params[1::2]:
            p += np.random.default_rng(len(p)).normal(size=p.shape).astype(np.float32)
    x = np.random.default_rng(0).normal(size=(16, sizes[0])).astype(np.float32)
    want = np.mean([m.forward(x) for m in members], axis=0)
    np.testing.assert_allclose(ensemble_as_mlp(members).forward(x), want, atol=1e-5)


def test_ensemble_refuses_mismatched_members() -> None:
    with pytest.raises(ValueError, match="share depth"):
        ensemble_as_mlp([MLP.init((4, 3, 2)), MLP.init((4, 3, 3, 2))])


def _scores() -> Scores:
    # device right on the confident half, wrong on two unsure ones; cloud wrong once
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.6, 0.55, 0.5, 0.4])
    y = np.arange(8) % 3
    dev = y.copy()
    dev[[5, 7]] = (y[[5, 7]] + 1) % 3
    cloud = y.copy()
    cloud[0] = (y[0] + 1) % 3
    return Scores(conf, dev, cloud, y)


def test_threshold_is_the_smallest_that_keeps_accuracy() -> None:
    s = _scores()
    assert s.cloud_accuracy == 7 / 8 and s.device_accuracy == 6 / 8
    point = choose_threshold(s, max_loss=0.0, confidence=0.0)
    # the cloud alone gets 7/8: sending only the 0.4 sample (a device error) matches it;
    # τ = 0.0 (all local) would lose a point of 1/8
    assert point.tau == 0.5 and point.local_share == 7 / 8 and point.accuracy == 7 / 8
    assert s.evaluate(0.6).accuracy == 1.0  # more escalations can beat the cloud alone
    # a loose target keeps everything local
    assert choose_threshold(s, max_loss=0.2, confidence=0.0).tau == 0.0
    # the curve's end points are the two models alone
    curve = cascade_curve(s)
    assert curve[0].local_share == 1.0 and curve[0].accuracy == s.device_accuracy
    assert curve[-1].local_share == 0.0 and curve[-1].accuracy == s.cloud_accuracy


def test_threshold_falls_back_to_all_cloud_when_device_is_always_worse() -> None:
    y = np.zeros(4, dtype=np.int64)
    s = Scores(np.array([0.9, 0.8, 0.7, 0.6]), np.ones(4, dtype=np.int64), y.copy(), y)
    point = choose_threshold(s, max_loss=0.0, confidence=0.0)
    assert point.local_share == 0.0 and point.accuracy == 1.0 and point.tau > 0.9


def test_bootstrap_rule_is_more_cautious_than_the_plain_rule() -> None:
    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 5, n)
    conf = rng.uniform(0.3, 1.0, n)
    # the device is right with probability = its confidence; the cloud 97 % of the time
    dev = np.where(rng.uniform(size=n) < conf, y, (y + 1) % 5)
    cloud = np.where(rng.uniform(size=n) < 0.97, y, (y + 2) % 5)
    s = Scores(conf, dev, cloud, y)
    plain = choose_threshold(s, 0.005, confidence=0.0)
    taus = [choose_threshold(s, 0.005, confidence=c).tau for c in (0.5, 0.8, 0.95)]
    assert plain.tau <= taus[0] <= taus[1] <= taus[2]
    assert plain.tau < taus[2]
    assert choose_threshold(s, 0.005, confidence=0.8, seed=1).tau > plain.tau


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        choose_threshold(_scores(), max_loss=1.5)
    with pytest.raises(UsageError):
        choose_threshold(_scores(), confidence=1.0)


@pytest.mark.slow
def test_score_samples_handles_more_rows_than_one_predictor_batch(device_pkg: Path,
                                                                  cloud_pkg: Path) -> None:
    from edgefleet.device.runtime.predictor import Predictor
    from edgefleet.models.core.tasks import get_task

    split = get_task("digits").split()
    reps = 2 * CHUNK // len(split.y_test) + 2  # three chunks, the last one partial
    x, y = np.tile(split.x_test, (reps, 1)), np.tile(split.y_test, reps)
    dev, cloud = Predictor.load(device_pkg, threads=1), Predictor.load(cloud_pkg, threads=1)
    big = score_samples(dev, cloud, x, y)
    one = score_samples(dev, cloud, split.x_test, split.y_test)
    assert len(big.y) == len(y) > 2 * CHUNK
    np.testing.assert_array_equal(big.device_pred, np.tile(one.device_pred, reps))
    np.testing.assert_array_equal(big.cloud_pred, np.tile(one.cloud_pred, reps))
    np.testing.assert_allclose(big.confidence, np.tile(one.confidence, reps), rtol=1e-6)
    assert big.cloud_accuracy == pytest.approx(one.cloud_accuracy)


@pytest.mark.slow
def test_cloud_beats_device_and_cascade_cli_stores_tau(device_pkg: Path, cloud_pkg: Path,
                                                       tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    shutil.copytree(device_pkg, dev)
    cloud = load_package(cloud_pkg)
    device = load_package(dev)
    assert cloud.default_variant == "onnx-fp32"
    assert cloud.lineage["ensemble"]["members"] == 3
    assert cloud.metrics["onnx-fp32"]["accuracy"] > device.metrics["onnx-int8"]["accuracy"]

    proc = run_cli("models", "cascade", str(dev), str(cloud_pkg), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    after = load_package(dev)  # every file hash still verifies
    assert after.fallback_threshold == report["tau"]
    assert 0.0 <= report["tau"] <= 1.0
    calib = report["calib"]
    assert calib["cascade_accuracy"] >= calib["cloud_accuracy"] - 0.005 - 1e-9
    assert after.metrics["cascade"]["cloud_model"] == f"{cloud.name}@{cloud.version}"
    assert after.metrics["onnx-int8"] == device.metrics["onnx-int8"]  # the rest is kept

    proc = run_cli("models", "cascade", str(dev), str(dev), "--json")
    assert proc.returncode == 0  # a model against itself: τ 0, everything local
    assert json.loads(proc.stdout)["tau"] == 0.0

    with (dev / "model_int8.onnx").open("ab") as fh:
        fh.write(b"x")
    proc = run_cli("models", "cascade", str(dev), str(cloud_pkg))
    assert proc.returncode != 0 and "model_int8.onnx" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("task", ["digits", "vibration"])
def test_cli_builds_cloud_and_device_with_tau(task: str, tmp_path: Path) -> None:
    proc = run_cli("models", "build", "--task", task, "--profile", "cloud", "--members", "3",
                   "--out", str(tmp_path / "cloud"), "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("models", "build", "--task", task, "--format", "onnx", "--out",
                   str(tmp_path / "dev"), "--cloud-package", str(tmp_path / "cloud"), "--json")
    assert proc.returncode == 0, proc.stderr
    dev = load_package(tmp_path / "dev")
    cloud = load_package(tmp_path / "cloud")
    assert cloud.metrics["onnx-fp32"]["accuracy"] > dev.metrics["onnx-int8"]["accuracy"]
    assert dev.fallback_threshold is not None
