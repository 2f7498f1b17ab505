"""Knowledge distillation: a small device MLP learns from a teacher package's soft targets.

The cloud ensemble is more accurate than anything that fits a device; its logits carry
how *similar* the classes look for each sample ("dark knowledge"), which hard labels
do not. The student minimizes, per batch (Hinton et al., 2015)::

    α · K² · KL(softmax(t/K) ‖ softmax(s/K)) + (1 − α) · CE(softmax(s), y)

``K²`` keeps the soft term's gradient on the scale of the hard term's as K grows.
Everything is NumPy so the same objective could run on a device or in the ServerApp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.backends import open_backend
from edgefleet.device.errors import UsageError
from edgefleet.device.golden import normalize
from edgefleet.device.package import Manifest, VariantName, load_package
from edgefleet.models.mlp import MLP, Params
from edgefleet.models.train import TrainConfig, train_sgd

__all__ = ["DistillSpec", "distill_objective", "teacher_logits", "train_distilled"]

Arr = npt.NDArray[np.floating]


@dataclass(frozen=True)
class DistillSpec:
    """Which teacher, at which temperature, and how much weight the soft targets get.

    The defaults (K = 2, α = 0.5) came from a four-point sweep on digits and vibration
    with 8- and 16-unit students (docs/bench/distill.md).
    """

    teacher: Path
    temperature: float = 2.0
    alpha: float = 0.5

    def check(self) -> None:
        """Refuse settings that make the objective meaningless."""
        if not self.temperature > 0:
            raise UsageError("--distill-temperature must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError("--alpha must be in [0, 1]")


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
    ``(1−α)·(softmax(s) − onehot(y))/n``.
    """
    k = float(temperature)
    log_pt = _log_softmax(np.asarray(teacher, dtype=np.float64) / k)
    pt = np.exp(log_pt)
    rows = np.arange(len(y))

    def fn(student: Arr) -> tuple[float, Arr]:
        n = len(y)
        log_ps_k = _log_softmax(np.asarray(student, dtype=np.float64) / k)
        log_ps = _log_softmax(student)
        kl = float(np.sum(pt * (log_pt - log_ps_k)) / n)
        ce = float(-np.mean(log_ps[rows, y]))
        hard = np.exp(log_ps)
        hard[rows, y] -= 1.0
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


def teacher_logits(path: Path, manifest: Manifest, x_raw: Arr) -> npt.NDArray[np.float32]:
    """The teacher's raw logits for raw inputs, from its fp32 variant when it has one."""
    key = _teacher_variant(manifest)
    backend = open_backend(Path(path), manifest.variants[key], threads=1)
    out: npt.NDArray[np.float32] = np.asarray(
        backend.run(normalize(x_raw, manifest.normalization)), dtype=np.float32)
    return out


def train_distilled(model: MLP, x: Arr, y: npt.NDArray[np.integer],
                    teacher: Arr, spec: DistillSpec, cfg: TrainConfig) -> MLP:
    """:func:`train_sgd` with the distillation objective instead of plain cross-entropy."""
    spec.check()

    def loss_and_grad(m: MLP, idx: npt.NDArray[np.intp]) -> tuple[float, Params]:
        return m.grad_from_logits(x[idx], distill_objective(teacher[idx], y[idx],
                                                            spec.temperature, spec.alpha))

    return train_sgd(model, np.asarray(x, dtype=np.float32), y, cfg,
                     loss_and_grad=loss_and_grad)


def lineage(spec: DistillSpec, manifest: Manifest) -> dict[str, Any]:
    """What the student's manifest records about its teacher."""
    key = _teacher_variant(manifest)
    return {"distill": {"teacher": f"{manifest.name}@{manifest.version}",
                        "teacher_variant": key,
                        "teacher_sha256": manifest.files[manifest.variants[key].file].sha256,
                        "teacher_layers": manifest.lineage.get("layers"),
                        "temperature": spec.temperature, "alpha": spec.alpha}}
