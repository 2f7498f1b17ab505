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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

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
F32 = npt.NDArray[np.float32]
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


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A folder beside ``out`` to build a package in (same file system, so
    :func:`publish` is a rename); removed if building fails."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, manifest: Manifest, out: Path) -> BuildResult:
    """Write ``manifest`` into the staged folder and put the package at ``out``."""
    write_manifest(tmp, manifest)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return BuildResult(out, manifest)


def package_files(pkg: Path) -> dict[str, FileEntry]:
    """The manifest's ``files``: every file at the package's top level."""
    return {p.name: FileEntry(sha256=file_sha256(p), size=p.stat().st_size)
            for p in sorted(pkg.iterdir()) if p.is_file()}


@dataclass(frozen=True)
class Measured:
    """Every variant run on the held-out rows: what the manifest records of them."""

    #: Per variant: ``accuracy`` and ``ece`` (with the package's temperature).
    metrics: dict[str, dict[str, float]]
    #: Per variant: its logits of every held-out row.
    logits: dict[str, F32]
    golden: list[GoldenSample]
    golden_atol: dict[str, float]
    #: Per int8 variant with an fp32 sibling: its ``int8-gap`` rule (models/build/golden.py).
    golden_rules: dict[str, dict[str, Any]]
    #: The drift reference: the default variant's confidences on the held-out rows.
    held_out_conf: F32 | None


def measure_variants(pkg: Path, variants: dict[VariantName, Variant], x_raw: np.ndarray,
                     x: F32, y: np.ndarray, temperature: float,
                     default: VariantName) -> Measured:
    """Run each variant on held-out rows ``x`` (``x_raw`` before normalization: what
    golden samples record), once each."""
    pick = np.linspace(0, len(y) - 1, min(N_GOLDEN, len(y))).astype(int)
    metrics: dict[str, dict[str, float]] = {}
    all_logits: dict[str, F32] = {}
    held_out_conf: F32 | None = None
    for key, var in variants.items():
        logits = open_backend(pkg, var, threads=1).run(x)
        if key == default:
            # The drift reference: what devices will see from this very variant on data
            # no step of building fitted (a federated model is pretrained on the
            # calibration split, and temperature is fitted there: its confidences on
            # that split are all but exactly 1.0, and no field looks like that).
            held_out_conf = softmax(logits, temperature).max(axis=1)
        all_logits[key] = logits
        metrics[key] = {
            "accuracy": float(np.mean(logits.argmax(1) == y)),
            "ece": expected_calibration_error(softmax(logits, temperature), y),
        }
    golden = [
        GoldenSample(input=[float(v) for v in np.ravel(x_raw[i])], label=int(y[i]),
                     logits={k: [float(v) for v in all_logits[k][i]] for k in variants})
        for i in pick
    ]
    atol, rules = golden_tolerances({k: v[pick] for k, v in all_logits.items()},
                                    {k: v.precision for k, v in variants.items()})
    return Measured(metrics, all_logits, golden, atol, rules, held_out_conf)


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

    with staged(out) as tmp:
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
        default_variant: VariantName = "onnx-int8"
        m = measure_variants(tmp, variants, split.x_test, xt, split.y_test, temperature,
                             default_variant)
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
            golden=m.golden,
            golden_atol=m.golden_atol,
            extra={GOLDEN_RULE_KEY: m.golden_rules} if m.golden_rules else {},
            files=package_files(tmp),
            metrics={"ece_uncalibrated": ece_before, "ece_calibrated": ece_after,
                     "test_samples": len(split.y_test), **m.metrics},
            lineage={"layers": list(model.sizes), "seed": seed, **extra_lineage,
                     **(lineage or {})},
            reference_stats=reference_stats(split.x_train, m.held_out_conf),
        )
        return publish(tmp, manifest, out)


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
