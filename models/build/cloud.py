"""The cloud (teacher) model: an ensemble of wider MLPs, packaged like a device model.

The cloud scorer answers the samples a device is unsure about, so it must be more
accurate than the int8 device model; it runs on a server, so it can be fp32 and larger.
An ensemble that averages the logits of K ReLU MLPs of the same depth *is* one wider
MLP (first layers side by side, deeper layers block-diagonal, the last layer stacked and
divided by K), so the ensemble ships in the ordinary package format and runs through the
same :class:`~edgefleet.device.runtime.predictor.Predictor` as any device model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.manifest import load_package, write_manifest
from edgefleet.device.runtime.mlp import MLP, Params
from edgefleet.models.build.pipeline import BuildResult, Progress, package_model
from edgefleet.models.core.tasks import get_task
from edgefleet.models.core.train import (
    TrainConfig,
    apply_normalization,
    fit_normalization,
    train_sgd,
)

__all__ = ["CloudOptions", "build_cloud_package", "ensemble_as_mlp"]


@dataclass(frozen=True)
class CloudOptions:
    """What ``models build --profile cloud`` trains.

    The defaults (5 members of one 256-unit hidden layer, weight decay 1e-3, 60 epochs)
    came from a small sweep on digits; stronger weight decay mattered more than width.
    """

    task: str = "digits"
    out: Path = Path("out/digits-cloud")
    members: int = 5
    hidden: Sequence[int] = (256,)
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=60,
                                                                   weight_decay=1e-3))
    name: str | None = None
    version: str = "1.0.0"


def ensemble_as_mlp(members: Sequence[MLP]) -> MLP:
    """One MLP whose logits are the mean of ``members``' logits (same depth and in/out).

    Exact, not an approximation: ReLU acts element-wise, so members placed side by side
    in block-diagonal weights never mix until the last layer averages them.
    """
    if not members:
        raise ValueError("an ensemble needs at least one member")
    depth = members[0].n_layers
    n_in, n_out = members[0].sizes[0], members[0].sizes[-1]
    for m in members:
        if m.n_layers != depth or m.sizes[0] != n_in or m.sizes[-1] != n_out:
            raise ValueError("ensemble members must share depth, input and output sizes")
    k = len(members)
    params: Params = []
    for layer in range(depth):
        ws = [m.params[2 * layer] for m in members]
        bs = [m.params[2 * layer + 1] for m in members]
        if layer == 0 and depth > 1:
            w = np.concatenate(ws, axis=1)
            b = np.concatenate(bs)
        elif layer == depth - 1:
            w = np.concatenate(ws, axis=0) / k if depth > 1 else np.mean(np.stack(ws), axis=0)
            b = np.mean(np.stack(bs), axis=0)
        else:
            rows = sum(x.shape[0] for x in ws)
            cols = sum(x.shape[1] for x in ws)
            w = np.zeros((rows, cols), dtype=np.float32)
            r = c = 0
            for x in ws:
                w[r:r + x.shape[0], c:c + x.shape[1]] = x
                r, c = r + x.shape[0], c + x.shape[1]
            b = np.concatenate(bs)
        params += [np.asarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32)]
    return MLP.from_params(params)


def build_cloud_package(opts: CloudOptions, progress: Progress | None = None) -> BuildResult:
    """Train ``opts.members`` MLPs on the task's training split and package their ensemble.

    The package holds fp32 and int8 ONNX (no TFLite: the cloud runs onnxruntime) and its
    default variant is ``onnx-fp32``; its manifest's lineage records every member.
    """
    if opts.members < 1:
        raise UsageError("--members must be >= 1")
    task = get_task(opts.task)
    say = progress or (lambda _m: None)
    split = task.split()
    norm = fit_normalization(split.x_train)
    x = apply_normalization(split.x_train, norm)
    hidden = tuple(opts.hidden)
    members = []
    for k in range(opts.members):
        seed = opts.seed * 1000 + 100 + k
        say(f"training cloud member {k + 1}/{opts.members} {(task.n_features, *hidden)}")
        cfg = TrainConfig(**{**opts.train.__dict__, "seed": seed})
        m = MLP.init((task.n_features, *hidden, task.n_classes), seed=seed)
        members.append(train_sgd(m, x, split.y_train, cfg))
    model = ensemble_as_mlp(members)
    lineage = {"source": "models build --profile cloud", "profile": "cloud",
               "ensemble": {"members": opts.members, "hidden": list(hidden),
                            "member_seeds": [opts.seed * 1000 + 100 + k
                                             for k in range(opts.members)]},
               "train": asdict(opts.train)}
    result = package_model(task, model, norm, opts.out, formats="onnx",
                           name=opts.name or f"{task.name}-cloud", version=opts.version,
                           lineage=lineage, seed=opts.seed, progress=progress)
    # The server runs full precision: make fp32 the default (the file list is unchanged).
    manifest = load_package(result.path).model_copy(update={"default_variant": "onnx-fp32"})
    write_manifest(result.path, manifest)
    return BuildResult(result.path, manifest)
