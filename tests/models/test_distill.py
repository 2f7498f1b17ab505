"""Distillation: the objective's gradient against finite differences, and the CLI build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.models.distill import DistillSpec, distill_objective, train_distilled
from edgefleet.models.mlp import MLP
from edgefleet.models.train import TrainConfig
from tests.conftest import run_cli


def _data(n: int = 10, d: int = 5, k: int = 4, seed: int = 1):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)), rng.integers(0, k, size=n),
            rng.normal(scale=3.0, size=(n, k)))


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.7), (2.0, 1.0)])
def test_distillation_gradient_matches_finite_differences(temperature: float,
                                                          alpha: float) -> None:
    x, y, teacher = _data()
    model = MLP.init((5, 7, 6, 4), seed=3)
    model.params = [p.astype(np.float64) for p in model.params]
    obj = distill_objective(teacher, y, temperature, alpha)
    _, grads = model.grad_from_logits(x, obj)

    def loss() -> float:
        return obj(model.forward(x))[0]

    eps = 1e-6
    rng = np.random.default_rng(0)
    for p, g in zip(model.params, grads, strict=True):
        for _ in range(6):
            idx = tuple(rng.integers(0, s) for s in p.shape)
            old = p[idx]
            p[idx] = old + eps
            up = loss()
            p[idx] = old - eps
            down = loss()
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - g[idx]) < 1e-6 + 1e-4 * abs(numeric), (idx, numeric, g[idx])


def test_alpha_zero_is_plain_cross_entropy() -> None:
    x, y, teacher = _data()
    model = MLP.init((5, 8, 4), seed=2)
    model.params = [p.astype(np.float64) for p in model.params]
    ce, g_ce = model.loss_and_grad(x, y)
    loss, g = model.grad_from_logits(x, distill_objective(teacher, y, 3.0, 0.0))
    assert loss == pytest.approx(ce)
    for a, b in zip(g, g_ce, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_soft_term_vanishes_when_student_equals_teacher() -> None:
    x, y, _ = _data()
    model = MLP.init((5, 8, 4), seed=2)
    model.params = [p.astype(np.float64) for p in model.params]
    loss, grads = model.grad_from_logits(x, distill_objective(model.forward(x), y, 4.0, 1.0))
    assert loss == pytest.approx(0.0, abs=1e-12)
    assert max(float(np.abs(g).max()) for g in grads) < 1e-12


def test_student_follows_teacher_soft_targets_without_labels() -> None:
    """With α = 1 the labels are ignored: a student fit to a teacher agrees with it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    teacher = MLP.init((4, 16, 3), seed=9)
    t_logits = teacher.forward(x)
    wrong = (teacher.predict(x) + 1) % 3  # labels that disagree everywhere
    student = train_distilled(MLP.init((4, 16, 3), seed=1), x, wrong, t_logits,
                              DistillSpec(Path("."), temperature=2.0, alpha=1.0),
                              TrainConfig(epochs=30, seed=0))
    assert np.mean(student.predict(x) == teacher.predict(x)) > 0.9


def test_bad_settings_are_refused() -> None:
    from edgefleet.device.errors import UsageError

    with pytest.raises(UsageError):
        DistillSpec(Path("."), temperature=0.0).check()
    with pytest.raises(UsageError):
        DistillSpec(Path("."), alpha=1.5).check()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cloud ensemble of digits (fast to train)."""
    from edgefleet.models.cloud import CloudOptions, build_cloud_package

    out = tmp_path_factory.mktemp("teacher") / "digits-cloud"
    build_cloud_package(CloudOptions(task="digits", out=out, members=2, hidden=(64,),
                                     train=TrainConfig(epochs=10, weight_decay=1e-3)))
    return out


@pytest.mark.slow
def test_models_build_distill_from_records_teacher_in_lineage(teacher: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "student"
    res = run_cli("models", "build", "--task", "digits", "--hidden", "16", "--format", "onnx",
                  "--epochs", "10", "--out", str(out), "--distill-from", str(teacher),
                  "--distill-temperature", "3", "--alpha", "0.6", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["onnx-int8"]["accuracy"] > 0.85
    info = json.loads(run_cli("models", "inspect", str(out), "--json").stdout)
    dist = info["lineage"]["distill"]
    t_manifest = json.loads((teacher / "manifest.json").read_text())
    assert dist["teacher"] == f"{t_manifest['name']}@{t_manifest['version']}"
    assert dist["teacher_sha256"] == t_manifest["files"]["model_fp32.onnx"]["sha256"]
    assert (dist["temperature"], dist["alpha"]) == (3.0, 0.6)
    assert info["lineage"]["layers"] == [64, 16, 10]
    assert sorted(info["variants"]) == ["onnx-fp32", "onnx-int8"]


@pytest.mark.slow
def test_distill_from_wrong_task_or_missing_package_is_refused(tmp_path: Path,
                                                               teacher: Path) -> None:
    res = run_cli("models", "build", "--task", "vibration", "--format", "onnx", "--epochs", "1",
                  "--out", str(tmp_path / "s"), "--distill-from", str(teacher))
    assert res.returncode != 0
    assert "is for task 'digits'" in res.stderr + res.stdout
    assert "Traceback" not in res.stderr
    res = run_cli("models", "build", "--format", "onnx", "--epochs", "1",
                  "--out", str(tmp_path / "s"), "--distill-from", str(tmp_path / "nope"))
    assert res.returncode != 0 and "not a model package" in res.stderr + res.stdout
    assert not (tmp_path / "s").exists()
