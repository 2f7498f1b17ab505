"""Distillation: the objective's gradient against finite differences, and the CLI build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.device.runtime.manifest import Normalization
from edgefleet.device.runtime.mlp import MLP
from edgefleet.models.core.distill import (
    DistillSpec,
    distill_objective,
    mixup_transfer,
    train_distilled,
)
from edgefleet.models.core.train import TrainConfig
from tests.conftest import run_cli


def _data(n: int = 10, d: int = 5, k: int = 4, seed: int = 1):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)), rng.integers(0, k, size=n),
            rng.normal(scale=3.0, size=(n, k)))


@pytest.mark.parametrize(("temperature", "alpha", "unlabelled"),
                         [(1.0, 0.5, False), (4.0, 0.7, False), (2.0, 1.0, False),
                          (2.0, 0.5, True)])
def test_distillation_gradient_matches_finite_differences(temperature: float, alpha: float,
                                                          unlabelled: bool) -> None:
    x, y, teacher = _data()
    if unlabelled:  # transfer rows: soft term only
        y[::3] = -1
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


def test_unlabelled_rows_have_no_hard_term() -> None:
    x, y, teacher = _data()
    model = MLP.init((5, 8, 4), seed=2)
    model.params = [p.astype(np.float64) for p in model.params]
    y_missing = y.copy()
    y_missing[:4] = -1
    # α = 0 keeps only the hard term: the unlabelled rows contribute nothing to it
    loss, grads = model.grad_from_logits(x, distill_objective(teacher, y_missing, 2.0, 0.0))
    ce, g_ce = model.loss_and_grad(x[4:], y[4:])
    assert loss == pytest.approx(ce * 6 / 10)
    for a, b in zip(grads, g_ce, strict=True):
        np.testing.assert_allclose(a, b * 6 / 10, rtol=1e-9, atol=1e-12)


def test_mixup_rows_are_convex_mixes_of_two_inputs() -> None:
    x = np.eye(6, dtype=np.float32) * 10.0  # each row's mass sits in its own column
    mixed = mixup_transfer(x, 200, np.random.default_rng(0))
    assert mixed.shape == (200, 6)
    assert np.all(mixed >= 0) and np.allclose(mixed.sum(axis=1), 10.0, atol=1e-4)
    assert np.all((mixed > 1e-6).sum(axis=1) <= 2)  # at most two sources per row


def test_mixup_student_learns_teacher_between_training_points() -> None:
    """With 20 labelled rows, the teacher's answers on mixup inputs teach the student more
    of the teacher's function than the 20 rows alone."""
    rng = np.random.default_rng(0)
    teacher = MLP.init((4, 32, 3), seed=9)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    probe = rng.normal(size=(2000, 4)).astype(np.float32)
    norm = Normalization(mean=[0.0] * 4, std=[1.0] * 4)
    calls: list[int] = []

    def t_fn(raw: np.ndarray) -> np.ndarray:
        calls.append(len(raw))
        return teacher.forward(raw)

    agree = {}
    for mix in (0.0, 8.0):
        spec = DistillSpec(Path("."), temperature=2.0, alpha=1.0, mixup=mix)
        student = train_distilled(MLP.init((4, 32, 3), seed=1), x, teacher.predict(x),
                                  teacher.forward(x), spec, TrainConfig(epochs=40, seed=0),
                                  x_raw=x, teacher_fn=t_fn, norm=norm)
        agree[mix] = float(np.mean(student.predict(probe) == teacher.predict(probe)))
    assert sum(calls) == 8 * 20 * 40  # one fresh transfer set per epoch, nothing for mix 0
    assert agree[8.0] > agree[0.0] + 0.03, agree


def test_bad_settings_are_refused() -> None:
    from edgefleet.device.core.errors import UsageError

    with pytest.raises(UsageError):
        DistillSpec(Path("."), temperature=0.0).check()
    with pytest.raises(UsageError):
        DistillSpec(Path("."), alpha=1.5).check()
    with pytest.raises(UsageError):
        DistillSpec(Path("."), mixup=-1.0).check()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small cloud ensemble of digits (fast to train)."""
    from edgefleet.models.build.cloud import CloudOptions, build_cloud_package

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
                  "--distill-temperature", "3", "--alpha", "0.6", "--distill-mixup", "0.5",
                  "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["onnx-int8"]["accuracy"] > 0.85
    info = json.loads(run_cli("models", "inspect", str(out), "--json").stdout)
    dist = info["lineage"]["distill"]
    t_manifest = json.loads((teacher / "manifest.json").read_text())
    assert dist["teacher"] == f"{t_manifest['name']}@{t_manifest['version']}"
    assert dist["teacher_sha256"] == t_manifest["files"]["model_fp32.onnx"]["sha256"]
    assert (dist["temperature"], dist["alpha"], dist["mixup"]) == (3.0, 0.6, 0.5)
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
