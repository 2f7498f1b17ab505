"""``models build``: train, calibrate, export, quantize and package one model.

The package is assembled in a temporary sibling folder and renamed into place at the
end, so an interrupted build never leaves a half-written package behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.manifest import (
    GOLDEN_RULE_KEY,
    FileEntry,
    GoldenSample,
    InputSpec,
    Manifest,
    Variant,
    VariantName,
    file_sha256,
    write_manifest,
)
from edgefleet.device.runtime.mlp import MLP, PARAMS_FILE, softmax, write_params
from edgefleet.models.build.golden import golden_tolerances
from edgefleet.models.build.onnx_export import export_onnx_fp32, quantize_onnx_int8
from edgefleet.models.core.calibration import expected_calibration_error, fit_temperature
from edgefleet.models.core.distill import DistillSpec
from edgefleet.models.core.reference_stats import reference_stats
from edgefleet.models.core.tasks import Task, get_task
from edgefleet.models.core.train import (
    TrainConfig,
    apply_normalization,
    fit_normalization,
    train_sgd,
)

__all__ = ["BuildOptions", "BuildResult", "build_package", "created_now", "package_model"]

log = logging.getLogger(__name__)

Format = Literal["onnx", "tflite", "all"]
N_GOLDEN = 4


@dataclass(frozen=True)
class BuildOptions:
    """Everything ``models build`` can be told."""

    task: str = "digits"
    out: Path = Path("out/digits")
    formats: Format = "all"
    hidden: Sequence[int] | None = None
    qat: bool = False
    prune: float = 0.0
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None
    version: str = "1.0.0"
    #: Learn from a teacher package's soft targets (``--distill-from``).
    distill: DistillSpec | None = None


@dataclass(frozen=True)
class BuildResult:
    """Where the package went and the headline numbers from building it."""

    path: Path
    manifest: Manifest


Progress = Callable[[str], None]


def created_now() -> str:
    """The manifest's ``created``: ``SOURCE_DATE_EPOCH`` when set (reproducible builds), else
    the current UTC time."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if epoch:
        try:
            when = dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise UsageError(f"SOURCE_DATE_EPOCH must be a Unix time, not {epoch!r}") from None
    else:
        when = dt.datetime.now(dt.UTC)
    return when.isoformat(timespec="seconds")


def _check_out(out: Path) -> None:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UsageError(f"output folder {parent} is not writable")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} exists and is not a folder")


def package_model(
    task: Task,
    model: MLP,
    norm_mean_std: Any,
    out: Path,
    *,
    formats: Format = "all",
    name: str | None = None,
    version: str = "1.0.0",
    lineage: dict[str, Any] | None = None,
    calib_x: np.ndarray | None = None,
    qat: bool = False,
    prune: float = 0.0,
    seed: int = 0,
    temperature: float | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Calibrate, export and quantize a trained ``model`` into a package folder at ``out``.

    Used by ``models build`` and by the end of a federated run, so both produce the same
    package format. ``norm_mean_std`` is the :class:`Normalization` the model was trained with.
    """
    say = progress or (lambda _m: None)
    _check_out(out)
    split = task.split()
    norm = norm_mean_std
    xc = apply_normalization(split.x_calib, norm)
    xt = apply_normalization(split.x_test, norm)
    xtr = apply_normalization(split.x_train, norm)
    if temperature is None:
        say("calibrating temperature")
        temperature = fit_temperature(model.forward(xc), split.y_calib)
    logits_t = model.forward(xt)
    ece_before = expected_calibration_error(softmax(logits_t), split.y_test)
    ece_after = expected_calibration_error(softmax(logits_t, temperature), split.y_test)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        variants: dict[VariantName, Variant] = {}
        say("exporting ONNX fp32")
        export_onnx_fp32(model, tmp / "model_fp32.onnx")
        variants["onnx-fp32"] = Variant(file="model_fp32.onnx", format="onnx", precision="fp32")
        say("quantizing ONNX int8 (static QDQ, per-channel)")
        cal = xtr if calib_x is None else calib_x
        quantize_onnx_int8(tmp / "model_fp32.onnx", tmp / "model_int8.onnx", cal)
        variants["onnx-int8"] = Variant(file="model_int8.onnx", format="onnx", precision="int8")
        extra_lineage: dict[str, Any] = {}
        if formats in ("tflite", "all"):
            from edgefleet.models.build.tflite_export import export_tflite_int8

            say("exporting TFLite int8" + (" with QAT" if qat else "")
                + (f", pruned to {prune:.0%}" if prune else ""))
            res = export_tflite_int8(model, tmp / "model_int8.tflite", cal, xtr, split.y_train,
                                     qat=qat, prune=prune, seed=seed)
            variants["tflite-int8"] = Variant(
                file="model_int8.tflite", format="tflite", precision="int8",
                input_quant=res.input_quant, output_quant=res.output_quant,
            )
            extra_lineage["tflite"] = {"qat": qat, "prune": prune, "sparsity": res.sparsity}
        write_params(tmp / PARAMS_FILE, model.params)

        say("computing golden outputs and test metrics")
        pick = np.linspace(0, len(split.y_test) - 1, N_GOLDEN).astype(int)
        golden_logits: dict[str, np.ndarray] = {}
        metrics: dict[str, Any] = {
            "ece_uncalibrated": ece_before, "ece_calibrated": ece_after,
            "test_samples": len(split.y_test),
        }
        default_variant: VariantName = "onnx-int8"
        held_out_conf = None
        for key, var in variants.items():
            backend = open_backend(tmp, var, threads=1)
            logits = backend.run(xt)
            if key == default_variant:
                # The drift reference: what devices will see from this very variant on
                # data no step of building fitted (a federated model is pretrained on the
                # calibration split, and temperature is fitted there: its confidences on
                # that split are all but exactly 1.0, and no field looks like that).
                held_out_conf = softmax(logits, temperature).max(axis=1)
            golden_logits[key] = logits[pick]
            metrics[key] = {
                "accuracy": float(np.mean(logits.argmax(1) == split.y_test)),
                "ece": expected_calibration_error(softmax(logits, temperature), split.y_test),
            }
        atol, rules = golden_tolerances(
            golden_logits, {k: v.precision for k, v in variants.items()})
        golden = [
            GoldenSample(input=[float(v) for v in split.x_test[i]], label=int(split.y_test[i]),
                         logits={k: [float(v) for v in golden_logits[k][j]] for k in variants})
            for j, i in enumerate(pick)
        ]
        files = {
            p.name: FileEntry(sha256=file_sha256(p), size=p.stat().st_size)
            for p in sorted(tmp.iterdir()) if p.is_file()
        }
        manifest = Manifest(
            name=name or f"{task.name}-mlp",
            version=version,
            task=task.name,
            created=created_now(),
            labels=list(task.labels),
            input=InputSpec(shape=[task.n_features], min_value=task.min_value,
                            max_value=task.max_value),
            normalization=norm,
            variants=variants,
            default_variant=default_variant,
            temperature=temperature,
            golden=golden,
            golden_atol=atol,
            extra={GOLDEN_RULE_KEY: rules} if rules else {},
            files=files,
            metrics=metrics,
            lineage={"layers": list(model.sizes), "seed": seed, **extra_lineage,
                     **(lineage or {})},
            reference_stats=reference_stats(split.x_train, held_out_conf),
        )
        write_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out, manifest)


def build_package(opts: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Train the task's MLP from scratch and package it (``models build``)."""
    task = get_task(opts.task)
    if not 0.0 <= opts.prune < 1.0:
        raise UsageError("--prune must be in [0, 1)")
    if opts.formats == "onnx" and (opts.qat or opts.prune):
        raise UsageError("--qat and --prune apply to the TFLite export: use --format tflite|all")
    _check_out(opts.out)
    say = progress or (lambda _m: None)
    say(f"loading task {task.name}")
    split = task.split()
    norm = fit_normalization(split.x_train)
    hidden = tuple(opts.hidden) if opts.hidden else task.default_hidden
    model = MLP.init((task.n_features, *hidden, task.n_classes), seed=opts.seed)
    cfg = TrainConfig(**{**opts.train.__dict__, "seed": opts.seed})
    x = apply_normalization(split.x_train, norm)
    lineage: dict[str, Any] = {"source": "models build", "train": cfg.__dict__}
    if opts.distill is None:
        say(f"training MLP {model.sizes} for {opts.train.epochs} epochs")
        train_sgd(model, x, split.y_train, cfg)
    else:
        from edgefleet.models.core import distill

        spec = opts.distill
        spec.check()
        teacher = distill.load_teacher(spec.teacher, task.name, list(task.labels))
        say(f"distilling MLP {model.sizes} from {teacher.name}@{teacher.version} "
            f"(K={spec.temperature:g}, α={spec.alpha:g}, mixup {spec.mixup:g}) "
            f"for {opts.train.epochs} epochs")
        t_fn = distill.teacher_function(spec.teacher, teacher)
        distill.train_distilled(model, x, split.y_train, t_fn(split.x_train), spec, cfg,
                                x_raw=split.x_train, teacher_fn=t_fn, norm=norm)
        lineage.update(distill.lineage(spec, teacher))
    return package_model(
        task, model, norm, opts.out, formats=opts.formats, name=opts.name, version=opts.version,
        lineage=lineage,
        qat=opts.qat, prune=opts.prune, seed=opts.seed, progress=progress,
    )
