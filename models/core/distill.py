"""Knowledge distillation: a small device MLP learns from a teacher package's soft targets.

The cloud ensemble is more accurate than anything that fits a device; its logits carry
how *similar* the classes look for each sample ("dark knowledge"), which hard labels
do not. The student minimizes, per batch (Hinton et al., 2015)::

    α · K² · KL(softmax(t/K) ‖ softmax(s/K)) + (1 − α) · CE(softmax(s), y)

``K²`` keeps the soft term's gradient on the scale of the hard term's as K grows.
The soft targets need not be limited to the training rows: with ``mixup`` > 0 every
epoch also gets a fresh *transfer set* of mixup inputs (``λ·a + (1 − λ)·b`` of two
random training inputs, λ ~ U(0, 1)), labelled by the teacher alone, so the student
sees the teacher's function between the training points too (the hard term is masked
on those rows).
Everything is NumPy so the same objective could run on a device or in the ServerApp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import Manifest, Normalization, VariantName, load_package
from edgefleet.device.runtime.mlp import MLP, Params
from edgefleet.models.core.train import TrainConfig, train_sgd

__all__ = ["DistillSpec", "distill_objective", "mixup_transfer", "teacher_logits",
           "train_distilled"]

Arr = npt.NDArray[np.floating]
#: Raw inputs -> the teacher's logits.
TeacherFn = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]
#: Rows per teacher call (bounded memory for long transfer sets).
TEACHER_CHUNK = 8192


@dataclass(frozen=True)
class DistillSpec:
    """Which teacher, at which temperature, and how much weight the soft targets get.

    The defaults (K = 4, α = 0.9, no mixup transfer set) were chosen on the validation
    samples (the calibration pool), never the test split, over digits and vibration with
    8- and 16-unit students (docs/bench/distill.md).
    """

    teacher: Path
    temperature: float = 4.0
    alpha: float = 0.9
    #: Mixup transfer rows per training row and epoch (0: soft targets on train rows only).
    mixup: float = 0.0

    def check(self) -> None:
        """Refuse settings that make the objective meaningless."""
        if not self.temperature > 0:
            raise UsageError("--distill-temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError("--alpha must be in [0, 1]")
        if not 0.0 <= self.mixup <= 16.0:
            raise UsageError("--distill-mixup must be in [0, 16]")


def _log_softmax(z: Arr) -> npt.NDArray[np.float64]:
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    out: npt.NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return out


def distill_objective(teacher: Arr, y: npt.NDArray[np.integer], temperature: float,
                      alpha: float) -> Callable[[Arr], tuple[float, Arr]]:
    """The batch loss of student logits and its gradient with respect to them.

    ``teacher`` are the teacher's logits for the same rows. The gradient of the soft
    term is ``α·K·(softmax(s/K) − softmax(t/K))/n``; of the hard term
    ``(1−α)·(softmax(s) − onehot(y))/n``. Rows labelled ``-1`` (transfer rows) have
    no hard term; ``n`` counts every row.
    """
    k = float(temperature)
    log_pt = _log_softmax(np.asarray(teacher, dtype=np.float64) / k)
    pt = np.exp(log_pt)
    y = np.asarray(y)
    rows = np.flatnonzero(y >= 0)
    labels = y[rows]

    def fn(student: Arr) -> tuple[float, Arr]:
        n = len(y)
        log_ps_k = _log_softmax(np.asarray(student, dtype=np.float64) / k)
        log_ps = _log_softmax(student)
        kl = float(np.sum(pt * (log_pt - log_ps_k)) / n)
        ce = float(-np.sum(log_ps[rows, labels]) / n)
        hard = np.exp(log_ps)
        hard[y < 0] = 0.0
        hard[rows, labels] -= 1.0
        grad = (alpha * k * (np.exp(log_ps_k) - pt) + (1.0 - alpha) * hard) / n
        return alpha * k * k * kl + (1.0 - alpha) * ce, grad.astype(student.dtype)

    return fn


def load_teacher(path: Path, task: str, labels: list[str]) -> Manifest:
    """Verify the teacher package and that it answers the same task with the same labels."""
    if not Path(path).is_dir():
        raise UsageError(f"--distill-from {path}: not a model package folder")
    manifest = load_package(path)
    if manifest.task != task:
        raise UsageError(f"teacher {path} is for task {manifest.task!r}, not {task!r}")
    if list(manifest.labels) != list(labels):
        raise UsageError(f"teacher {path} has different labels from task {task!r}")
    return manifest


def _teacher_variant(manifest: Manifest) -> VariantName:
    return "onnx-fp32" if "onnx-fp32" in manifest.variants else manifest.default_variant


def teacher_function(path: Path, manifest: Manifest) -> TeacherFn:
    """Raw inputs -> the teacher's logits, from its fp32 variant when it has one."""
    key = _teacher_variant(manifest)
    backend = open_backend(Path(path), manifest.variants[key], threads=1)

    def fn(x_raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(backend.run(normalize(x_raw, manifest.normalization)),
                          dtype=np.float32)

    return fn


def teacher_logits(path: Path, manifest: Manifest, x_raw: Arr) -> npt.NDArray[np.float32]:
    """The teacher's raw logits for raw inputs, from its fp32 variant when it has one."""
    return teacher_function(path, manifest)(np.asarray(x_raw, dtype=np.float32))


def mixup_transfer(x_raw: npt.NDArray[np.floating], rows: int,
                   rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """``rows`` convex mixes ``λ·a + (1 − λ)·b`` of random pairs of inputs, λ ~ U(0, 1)."""
    x = np.asarray(x_raw, dtype=np.float32)
    a = rng.integers(0, len(x), rows)
    b = rng.integers(0, len(x), rows)
    lam = rng.uniform(0.0, 1.0, (rows, 1)).astype(np.float32)
    out: npt.NDArray[np.float32] = lam * x[a] + (1.0 - lam) * x[b]
    return out


def train_distilled(model: MLP, x: Arr, y: npt.NDArray[np.integer],
                    teacher: Arr, spec: DistillSpec, cfg: TrainConfig, *,
                    x_raw: npt.NDArray[np.floating] | None = None,
                    teacher_fn: TeacherFn | None = None,
                    norm: Normalization | None = None) -> MLP:
    """:func:`train_sgd` with the distillation objective instead of plain cross-entropy.

    ``teacher`` are the teacher's logits for the rows of ``x``. With ``spec.mixup`` > 0
    and ``x_raw``, ``teacher_fn`` and the student's ``norm`` given, each epoch also
    trains on ``mixup × len(x)`` fresh mixup rows with the teacher's soft targets only.
    An epoch still means one pass over the labelled rows plus its transfer rows.
    """
    spec.check()
    n = len(y)
    extra = round(spec.mixup * n)
    if extra == 0 or x_raw is None or teacher_fn is None or norm is None:
        def loss_and_grad(m: MLP, idx: npt.NDArray[np.intp]) -> tuple[float, Params]:
            return m.grad_from_logits(x[idx], distill_objective(
                teacher[idx], y[idx], spec.temperature, spec.alpha))

        return train_sgd(model, np.asarray(x, dtype=np.float32), y, cfg,
                         loss_and_grad=loss_and_grad)
    # Every epoch's transfer rows up front (train_sgd visits n + extra rows per epoch;
    # a row index >= n is a transfer row of the current epoch).
    rng = np.random.default_rng([cfg.seed, 1])
    mixed = mixup_transfer(x_raw, extra * cfg.epochs, rng)
    t_mixed = np.concatenate([teacher_fn(mixed[i:i + TEACHER_CHUNK])
                              for i in range(0, len(mixed), TEACHER_CHUNK)])
    x_mixed = normalize(mixed, norm)
    x_all = np.asarray(x, dtype=np.float32)
    t_all = np.asarray(teacher, dtype=np.float32)
    y_all = np.concatenate([np.asarray(y, dtype=np.int64), np.full(extra, -1, np.int64)])
    epoch = [0]

    def mixed_loss_and_grad(m: MLP, idx: npt.NDArray[np.intp]) -> tuple[float, Params]:
        own = idx[idx < n]
        moved = (idx[idx >= n] - n) + epoch[0] * extra
        xb = np.concatenate([x_all[own], x_mixed[moved]])
        tb = np.concatenate([t_all[own], t_mixed[moved]])
        yb = np.concatenate([np.asarray(y)[own], np.full(len(moved), -1)])
        return m.grad_from_logits(xb, distill_objective(tb, yb, spec.temperature,
                                                        spec.alpha))

    def next_epoch(_epoch: int, _loss: float) -> None:
        epoch[0] += 1

    return train_sgd(model, x_all, y_all, cfg, on_epoch=next_epoch,
                     loss_and_grad=mixed_loss_and_grad)


def lineage(spec: DistillSpec, manifest: Manifest) -> dict[str, Any]:
    """What the student's manifest records about its teacher."""
    key = _teacher_variant(manifest)
    return {"distill": {"teacher": f"{manifest.name}@{manifest.version}",
                        "teacher_variant": key,
                        "teacher_sha256": manifest.files[manifest.variants[key].file].sha256,
                        "teacher_layers": manifest.lineage.get("layers"),
                        "temperature": spec.temperature, "alpha": spec.alpha,
                        "mixup": spec.mixup}}
