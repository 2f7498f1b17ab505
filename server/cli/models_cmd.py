"""``edgefleet models``: build, evaluate and inspect model packages."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.device.core.cli_support import console, print_json

__all__ = ["app"]

app = typer.Typer(
    help="Build, evaluate and inspect model packages (fp32 → int8 ONNX and TFLite).",
    no_args_is_help=True,
)


class FormatChoice(StrEnum):
    """Which model files to produce."""

    onnx = "onnx"
    tflite = "tflite"
    all = "all"


class ProfileChoice(StrEnum):
    """Which model to build: the small int8 device model or the cloud (teacher) ensemble."""

    device = "device"
    cloud = "cloud"


@app.command()
def build(
    task: str = typer.Option("digits", help="Task to train on (digits, vibration)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the package to."),
    fmt: FormatChoice = typer.Option(FormatChoice.all, "--format",
                                     help="onnx: fp32+int8 ONNX only (no TensorFlow needed); "
                                          "tflite/all: also int8 TFLite."),
    qat: bool = typer.Option(False, "--qat", help="Quantization-aware fine-tuning for TFLite."),
    prune: float = typer.Option(0.0, "--prune", min=0.0, max=0.95,
                                help="Magnitude-prune TFLite weights to this sparsity."),
    seed: int = typer.Option(0, "--seed", help="Seed for init, shuffling and fine-tuning."),
    hidden: str = typer.Option("", "--hidden", help="Hidden layer sizes, e.g. 128,64."),
    epochs: int = typer.Option(0, "--epochs", min=0,
                               help="Training epochs (0: 40 for device, 60 for cloud)."),
    version: str = typer.Option("1.0.0", "--version", help="Version written to the manifest."),
    profile: ProfileChoice = typer.Option(
        ProfileChoice.device, "--profile",
        help="device: the int8 device model; cloud: an fp32 ensemble for the cloud scorer."),
    members: int = typer.Option(5, "--members", min=1, help="Cloud profile: ensemble size."),
    cloud_package: Path | None = typer.Option(
        None, "--cloud-package", help="Device profile: choose the fallback threshold τ "
        "against this cloud package and store it in the manifest."),
    max_loss: float = typer.Option(0.005, "--max-loss", min=0.0, max=0.5,
                                   help="With --cloud-package: accuracy the cascade may lose "
                                        "against the cloud model alone."),
    distill_from: Path | None = typer.Option(
        None, "--distill-from", help="Device profile: learn from this teacher package's soft "
        "targets (e.g. the cloud model) mixed with the labels."),
    distill_temperature: float = typer.Option(4.0, "--distill-temperature", min=0.05,
                                              help="With --distill-from: softmax temperature K "
                                                   "of both teacher and student."),
    alpha: float = typer.Option(0.9, "--alpha", min=0.0, max=1.0,
                                help="With --distill-from: weight of the soft-target term "
                                     "(1 - alpha goes to the labels)."),
    distill_mixup: float = typer.Option(0.0, "--distill-mixup", min=0.0, max=16.0,
                                        help="With --distill-from: mixup inputs per training "
                                             "row and epoch labelled by the teacher alone "
                                             "(transfer set; 0: training rows only)."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest's metrics as JSON."),
) -> None:
    """Train the task's model, calibrate it, export fp32 ONNX, int8 ONNX and int8 TFLite.

    Examples:

        edgefleet models build --task digits --out out/digits --qat
        edgefleet models build --task digits --profile cloud --out out/digits-cloud
        edgefleet models build --task digits --out out/digits --cloud-package out/digits-cloud
        edgefleet models build --task digits --hidden 16 --out out/digits-small \
            --distill-from out/digits-cloud --distill-temperature 4 --alpha 0.9
    """
    from edgefleet.device.core.errors import UsageError
    from edgefleet.models.build.pipeline import BuildOptions, build_package
    from edgefleet.models.core.distill import DistillSpec
    from edgefleet.models.core.train import TrainConfig

    try:
        sizes = tuple(int(s) for s in hidden.split(",") if s.strip()) or None
    except ValueError:
        raise UsageError(f"--hidden must be comma-separated integers, not {hidden!r}") from None
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=json_out) as bar:
        tid = bar.add_task("building", total=None)
        if profile is ProfileChoice.cloud:
            from edgefleet.models.build.cloud import CloudOptions, build_cloud_package

            if cloud_package is not None or distill_from is not None:
                raise UsageError("--cloud-package and --distill-from apply to --profile device")
            base = CloudOptions()
            copts = replace(base, task=task, out=out, members=members, seed=seed,
                            version=version, hidden=sizes or base.hidden,
                            train=replace(base.train, epochs=epochs or base.train.epochs))
            result = build_cloud_package(copts, progress=lambda m: bar.update(tid,
                                                                              description=m))
        else:
            spec = None if distill_from is None else DistillSpec(
                distill_from, distill_temperature, alpha, distill_mixup)
            opts = BuildOptions(task=task, out=out, formats=fmt.value, hidden=sizes, qat=qat,
                                prune=prune, seed=seed, train=TrainConfig(epochs=epochs or 40),
                                version=version, distill=spec)
            result = build_package(opts, progress=lambda m: bar.update(tid, description=m))
            if cloud_package is not None:
                from edgefleet.models.core.cascade import apply_cascade

                bar.update(tid, description="choosing the fallback threshold τ")
                apply_cascade(result.path, cloud_package, max_loss=max_loss)
                from edgefleet.device.runtime.manifest import load_package

                result = type(result)(result.path, load_package(result.path))
    if json_out:
        print_json({"package": str(result.path), "metrics": result.manifest.metrics,
                    "fallback_threshold": result.manifest.fallback_threshold})
        return
    m = result.manifest
    console.print(f"[green]built[/] {m.name} {m.version} → {result.path}")
    for key in m.variants:
        acc = m.metrics.get(key, {}).get("accuracy")
        console.print(f"  {key:12s} accuracy {acc:.4f}" if acc is not None else f"  {key}")
    console.print(f"  temperature {m.temperature:.3f}, ECE {m.metrics['ece_uncalibrated']:.4f}"
                  f" → {m.metrics['ece_calibrated']:.4f}")
    if m.fallback_threshold is not None:
        console.print(f"  fallback τ {m.fallback_threshold:.4f}")


@app.command()
def cascade(
    device_package: Path = typer.Argument(..., help="Device model package (gets the τ)."),
    cloud_package: Path = typer.Argument(..., help="Cloud model package of the same task."),
    max_loss: float = typer.Option(0.005, "--max-loss", min=0.0, max=0.5,
                                   help="Accuracy the cascade may lose against the cloud "
                                        "model alone (0.005 = half a point)."),
    confidence: float = typer.Option(0.8, "--confidence", min=0.0, max=0.99,
                                     help="Share of bootstrap resamples of the calibration "
                                          "samples in which τ must meet --max-loss (0: the "
                                          "plain empirical rule)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report τ without writing it."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object with τ and figures."),
) -> None:
    """Choose the device's fallback threshold τ against a cloud model and store it.

    τ is the smallest threshold (fewest escalations) whose cascade accuracy on the
    calibration split (plus the task's extra calibration samples, if it has any) stays
    within --max-loss of the cloud model alone, in at least --confidence of paired
    bootstrap resamples of those samples. Only
    manifest.json is rewritten (fallback_threshold, metrics.cascade); file hashes hold.

    Example: edgefleet models cascade out/digits out/digits-cloud --max-loss 0.005
    """
    from edgefleet.models.core.cascade import apply_cascade

    report = apply_cascade(device_package, cloud_package, max_loss=max_loss,
                           confidence=confidence, write=not dry_run)
    if json_out:
        print_json(report.as_dict())
        return
    verb = "would set" if dry_run else "set"
    console.print(f"{verb} τ = {report.tau:.4f} in {device_package} (cloud "
                  f"{report.cloud_model}, max loss {max_loss:.3%})")
    table = Table("split", "answered locally", "cascade acc", "device acc", "cloud acc")
    for name, r in (("calibration", report.calib), ("test", report.test)):
        table.add_row(name, f"{r['local_share']:.1%}", f"{r['cascade_accuracy']:.2%}",
                      f"{r['device_accuracy']:.2%}", f"{r['cloud_accuracy']:.2%}")
    console.print(table)


class LayoutChoice(StrEnum):
    """Where an imported model's channels are."""

    flat = "flat"
    nhwc = "NHWC"
    nchw = "NCHW"
    nwc = "NWC"


def _floats(text: str, what: str) -> list[float]:
    from fractions import Fraction

    from edgefleet.device.core.errors import UsageError

    try:
        return [float(Fraction(v.strip())) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{what} must be comma-separated numbers (1/255 allowed), "
                         f"not {text!r}") from None


@app.command("import")
def import_(
    model: Path = typer.Argument(..., help="fp32 .onnx, .keras, SavedModel folder, or "
                                 "full-integer int8 .tflite."),
    calibration: Path = typer.Option(..., "--calibration", help=".npz with x (raw inputs, "
                                     "the model's layout) and y (integer labels)."),
    eval_data: Path = typer.Option(..., "--eval", help=".npz with x and y, held out from "
                                   "everything else, for the reported metrics."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the package to."),
    labels: Path | None = typer.Option(None, "--labels", help="Class names, one a line."),
    head_from: str | None = typer.Option(None, "--head-from", help="ONNX node where the "
                                         "trainable head starts (default: the last "
                                         "Gemm/MatMul before the output)."),
    layout: LayoutChoice | None = typer.Option(None, "--layout", help="Input layout "
                                               "(default: from the input's shape)."),
    scale: str = typer.Option("1", "--scale", help="Preprocessing: x * scale, e.g. 1/255."),
    mean: str = typer.Option("0", "--mean", help="Preprocessing: subtract (one value, or "
                             "one per channel)."),
    std: str = typer.Option("1", "--std", help="Preprocessing: divide (one value, or one "
                            "per channel)."),
    name: str | None = typer.Option(None, "--name", help="Package name (default: the "
                                    "model file's name)."),
    version: str = typer.Option("1.0.0", "--version", help="Version written to the manifest."),
    task: str = typer.Option("custom", "--task", help="Task name written to the manifest."),
    json_out: bool = typer.Option(False, "--json", help="Print the metrics and lineage as JSON."),
) -> None:
    """Package your own model: fp32 ONNX, int8 ONNX (and int8 TFLite from Keras/SavedModel),
    calibrated, quantized and measured on your data.

    Examples:

        edgefleet models import cnn.keras --calibration calib.npz --eval eval.npz \
            --labels labels.txt --scale 1/255 --out out/cnn
        edgefleet models import model.onnx --calibration calib.npz --eval eval.npz --out out/m
    """
    from edgefleet.device.core.errors import UsageError
    from edgefleet.models.build.importer import ImportOptions, import_model

    scales = _floats(scale, "--scale")
    if len(scales) != 1:
        raise UsageError("--scale takes one number")
    opts = ImportOptions(model=model, calibration=calibration, eval=eval_data, out=out,
                         labels=labels, head_from=head_from, name=name, version=version,
                         task=task, layout=None if layout is None else layout.value,
                         scale=scales[0], mean=_floats(mean, "--mean"), std=_floats(std, "--std"))
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=json_out) as bar:
        tid = bar.add_task("importing", total=None)
        result = import_model(opts, progress=lambda m: bar.update(tid, description=m))
    m = result.manifest
    if json_out:
        print_json({"package": str(result.path), "metrics": m.metrics, "lineage": m.lineage,
                    "input": m.input.model_dump(mode="json")})
        return
    console.print(f"[green]imported[/] {m.name} {m.version} → {result.path}")
    for key in m.variants:
        r = m.metrics.get(key, {})
        console.print(f"  {key:12s} accuracy {r.get('accuracy', float('nan')):.4f}  "
                      f"ECE {r.get('ece', float('nan')):.4f}  "
                      f"{r.get('size_bytes', 0) / 1024:.1f} KiB")
    q = m.lineage.get("quantization", {}).get("onnx")
    if q:
        console.print(f"  int8 ONNX calibration: {q['method']} (held-out accuracy "
                      + ", ".join(f"{k} {v:.4f}" for k, v in q["method_scores_heldout"].items())
                      + ")")
    console.print(f"  temperature {m.temperature:.3f}, ECE {m.metrics['ece_uncalibrated']:.4f}"
                  f" → {m.metrics['ece_calibrated']:.4f}")


@app.command("eval")
def eval_(
    package: Path = typer.Argument(..., help="Model package folder."),
    runs: int = typer.Option(200, "--runs", min=10, help="Timed runs per latency figure."),
    data: Path | None = typer.Option(None, "--data", help="Evaluation .npz (x, y) for an "
                                     "imported model (built-in tasks use their test split)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object, a key per variant."),
) -> None:
    """Accuracy, ECE, size and median latency of every variant on the held-out test split.

    A second table shows the accuracy of each class, so a class the model fails on is
    not hidden by the average (``--json``: ``per_class_accuracy`` per variant).

    Examples: edgefleet models eval out/digits;
    edgefleet models eval out/cnn --data eval.npz
    """
    from edgefleet.models.core.evaluate import evaluate_package

    manifest, res = evaluate_package(package, runs=runs, data=data)
    if json_out:
        print_json(res)
        return
    table = Table(title=f"{manifest.name} {manifest.version} ({manifest.task}, "
                  f"T={manifest.temperature:.2f})")
    for col in ("variant", "accuracy", "ECE", "size", "p50 latency", "agree fp32"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    for key, r in res.items():
        table.add_row(key, f"{r['accuracy']:.4f}", f"{r['ece']:.4f}",
                      f"{r['size_bytes'] / 1024:.1f} KiB", f"{r['latency_ms_p50']:.3f} ms",
                      f"{r.get('agreement_with_fp32', float('nan')):.2%}")
    console.print(table)
    per_class = Table(title="accuracy per class (test split)")
    per_class.add_column("class")
    for key in res:
        per_class.add_column(key, justify="right")
    worst = {k: min(r["per_class_accuracy"].values(), default=None) for k, r in res.items()}
    labels: list[str] = list(manifest.labels)
    for label in labels:
        cells = []
        for k in res:
            v = res[k]["per_class_accuracy"].get(label)
            cells.append("-" if v is None else f"[red]{v:.4f}[/]" if v == worst[k] and v < 1
                         else f"{v:.4f}")
        per_class.add_row(label, *cells)
    console.print(per_class)
    console.print("worst class (red): " + ", ".join(
        f"{k} {min(r['per_class_accuracy'], key=r['per_class_accuracy'].get)}"
        for k, r in res.items() if r["per_class_accuracy"]))


@app.command()
def bench(
    package: Path = typer.Argument(..., help="Model package folder."),
    runs: int = typer.Option(2000, "--runs", min=100, help="Timed calls per figure."),
    threads: int = typer.Option(3, "--threads", min=1, help="Runtime threads."),
    json_out: bool = typer.Option(False, "--json",
                                  help="{backend: {variant, predictor_ms_p50, raw_ms_p50, "
                                       "ratio, cascade_ms_p50}}."),
) -> None:
    """Predictor overhead: its median batch-1 latency against the bare runtime call.

    Both are timed in alternating blocks in one run on the same int8 model and input,
    with a third series: the same sample through the cascade (a HybridPredictor
    answering locally). The package is verified first; an altered package is refused.

    Example: edgefleet models bench out/digits --json
    """
    from edgefleet.device.inference.bench import bench_package

    res = bench_package(package, runs=runs, threads=threads)
    if json_out:
        print_json(res)
        return
    table = Table(title=f"{package}: batch 1, median of {runs} calls")
    for col in ("backend", "variant", "predictor", "bare runtime", "ratio", "cascade"):
        table.add_column(col, justify="left" if col in ("backend", "variant") else "right")
    for name, r in res.items():
        table.add_row(name, str(r["variant"]), f"{r['predictor_ms_p50'] * 1e3:.1f} µs",
                      f"{r['raw_ms_p50'] * 1e3:.1f} µs", f"{r['ratio']:.2f}",
                      f"{r['cascade_ms_p50'] * 1e3:.1f} µs")
    console.print(table)


@app.command()
def inspect(
    package: Path = typer.Argument(..., help="Model package folder."),
    json_out: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Verify a package's files against its manifest and show what it holds."""
    from edgefleet.device.runtime.manifest import load_package

    m = load_package(package)
    if json_out:
        print_json(m.model_dump(mode="json"))
        return
    console.print(f"[bold]{m.name}[/] {m.version}  task={m.task}  created={m.created}")
    console.print(f"input {m.input.dtype}{m.input.shape}  labels={len(m.labels)}  "
                  f"temperature={m.temperature:.3f}  fallback τ={m.fallback_threshold}")
    if m.input.layout is not None:
        pre = m.input.preprocessing
        console.print(f"input spec: layout {m.input.layout}" + (
            f", preprocessing (x * {pre.scale:g} - {pre.mean}) / {pre.std}" if pre else ""))
    if m.head is not None:
        console.print(f"head cut: {m.head.op} node {m.head.node!r} on {m.head.embedding!r} "
                      f"(dim {m.head.dim}, {'auto' if m.head.auto else '--head-from'})")
        src = m.lineage.get("model", {}).get("source_names")
        if isinstance(src, dict) and src:
            console.print(f"  converted as node {src.get('head_node')!r} on "
                          f"{src.get('embedding')!r}")
    for key in m.variants:
        r = m.metrics.get(key)
        if isinstance(r, dict) and "accuracy" in r:
            console.print(f"  {key:12s} accuracy {r['accuracy']:.4f}  ECE "
                          f"{r.get('ece', float('nan')):.4f}")
    _print_lineage(m.lineage)
    table = Table("file", "size", "sha256")
    for name, entry in m.files.items():
        table.add_row(name, f"{entry.size}", entry.sha256[:16] + "…")
    console.print(table)
    console.print("[green]all files match the manifest[/]")


def _print_lineage(lineage: dict[str, object], indent: str = "  ") -> None:
    """The lineage as an indented tree (hashes, versions, quantization settings)."""
    if indent == "  ":
        console.print("lineage:")
    for key, value in lineage.items():
        if isinstance(value, dict):
            console.print(f"{indent}{key}:")
            _print_lineage(value, indent + "  ")
        else:
            console.print(f"{indent}{key}: {value}", markup=False)
