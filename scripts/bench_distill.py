"""Distillation benchmark: teacher vs distilled student vs the same student on labels only.

For each task (digits, vibration) it builds the cloud ensemble (the teacher, fp32) with
``models build --profile cloud`` defaults. Then, without looking at the test split, it
chooses the distillation settings on the validation samples (the task's calibration
pool): small students (one hidden layer of 8 and 16 units, seeds 0-2) are trained in
process with each candidate (K, α, mixup transfer set or not) and the labels-only
baseline, and the candidate with the best mean validation accuracy over both tasks and
sizes wins. With it, for seeds 0-4, the same student is built twice through the real
pipeline (``build_package``, int8 ONNX, same 40 epochs and seed): on labels only, and
with ``--distill-from`` the teacher. Every int8 student is measured with ``models eval``
(accuracy, ECE, size, latency) and ``models cascade`` against the teacher. Writes
``docs/bench/distill.md``.

    .venv/bin/python scripts/bench_distill.py      # or: make bench
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.mlp import MLP
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.cloud import CloudOptions, build_cloud_package
from edgefleet.models.build.pipeline import BuildOptions, build_package
from edgefleet.models.core.cascade import DEFAULT_MAX_LOSS, apply_cascade
from edgefleet.models.core.distill import DistillSpec, teacher_function, train_distilled
from edgefleet.models.core.evaluate import evaluate_package
from edgefleet.models.core.tasks import get_task
from edgefleet.models.core.train import (
    TrainConfig,
    apply_normalization,
    fit_normalization,
    train_sgd,
)

TASKS = ("digits", "vibration")
HIDDEN = (8, 16)
SWEEP_SEEDS = (0, 1, 2)
SEEDS = (0, 1, 2, 3, 4)
DEFAULT = DistillSpec(Path("."))  # the CLI defaults: K, α, mixup


@dataclass(frozen=True)
class Candidate:
    """One setting of the validation sweep (``spec`` None: labels only)."""

    name: str
    spec: DistillSpec | None
    epochs: int = 40


CANDIDATES = (
    Candidate("labels only", None),
    Candidate("labels only, 80 epochs", None, 80),
    *(Candidate(f"K={k:g}, α={a:g}" + (", mixup" if mix else ""),
                DistillSpec(Path("."), k, a, 1.0 if mix else 0.0))
      for mix in (False, True) for k, a in ((2.0, 0.5), (2.0, 0.9), (4.0, 0.9))),
)


def validation_accuracy(task: str, hidden: int, seed: int, cand: Candidate,
                        cloud: Path) -> float:
    """Train one fp32 student in process exactly as ``build_package`` does; score it on
    the validation samples (the calibration pool, never the test split)."""
    t = get_task(task)
    split = t.split()
    norm = fit_normalization(split.x_train)
    x = apply_normalization(split.x_train, norm)
    model = MLP.init((t.n_features, hidden, t.n_classes), seed=seed)
    cfg = TrainConfig(epochs=cand.epochs, seed=seed)
    if cand.spec is None:
        train_sgd(model, x, split.y_train, cfg)
    else:
        t_fn = teacher_function(cloud, load_package(cloud))
        train_distilled(model, x, split.y_train, t_fn(split.x_train), cand.spec, cfg,
                        x_raw=split.x_train, teacher_fn=t_fn, norm=norm)
    xv, yv = t.calib_pool()
    return model.accuracy(apply_normalization(xv, norm), yv)


def sweep(clouds: dict[str, Path]) -> tuple[Candidate, list[list[Any]]]:
    """Mean validation accuracy per candidate and setting; the best distilled candidate."""
    table: list[list[Any]] = []
    score: dict[str, float] = {}
    for cand in CANDIDATES:
        row: list[Any] = [cand.name]
        means = []
        for task in TASKS:
            for hidden in HIDDEN:
                accs = [validation_accuracy(task, hidden, s, cand, clouds[task])
                        for s in SWEEP_SEEDS]
                means.append(statistics.fmean(accs))
                row.append(f"{means[-1] * 100:.2f}")
        score[cand.name] = statistics.fmean(means)
        row.append(f"{score[cand.name] * 100:.2f}")
        table.append(row)
        print("sweep", row, flush=True)
    best = max((c for c in CANDIDATES if c.spec is not None), key=lambda c: score[c.name])
    return best, table


def fresh_samples(task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cascade benchmark's 14 000 fresh simulated windows (None for real data)."""
    if task != "vibration":
        return None
    from bench_cascade import fresh_samples as cascade_fresh

    return cascade_fresh(task)


def measure(pkg: Path, variant: str, cloud: Path | None,
            fresh: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """models eval of one variant, the cascade's local share against ``cloud``, and the
    accuracy on ``fresh`` samples."""
    _, res = evaluate_package(pkg, runs=300)
    r = res[variant]
    out = {"accuracy": r["accuracy"], "ece": r["ece"], "size": r["size_bytes"] / 1024,
           "latency": r["latency_ms_p50"] * 1e3}
    if fresh is not None:
        pred = Predictor.load(pkg, variant=variant, threads=1)
        x, y = fresh
        labels = [p.label for i in range(0, len(y), 2048)
                  for p in pred.predict_batch(x[i:i + 2048])]
        out["fresh"] = float(np.mean(np.asarray(labels) == y))
    if cloud is not None:
        rep = apply_cascade(pkg, cloud, max_loss=DEFAULT_MAX_LOSS, write=False)
        out["local"] = rep.test["local_share"]
        out["cascade_acc"] = rep.test["cascade_accuracy"]
    return out


def mean(rows: list[dict[str, float]], key: str) -> float:
    """Mean of one figure over seeds."""
    return statistics.fmean(r[key] for r in rows)


def spread(rows: list[dict[str, float]], key: str, scale: float = 100.0) -> str:
    """``mean ± sd`` over seeds, in percent by default."""
    vals = [r[key] * scale for r in rows]
    return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def run_task(task: str, cloud: Path, spec: DistillSpec, work: Path
             ) -> tuple[list[list[Any]], list[list[Any]], int]:
    """Rows of the main table and of the gap-closure table for one task; targets met."""
    fresh = fresh_samples(task)
    teacher = measure(cloud, "onnx-fp32", None, fresh)
    rows: list[list[Any]] = [[task, "teacher (cloud ensemble, fp32)", "5×256",
                              f"{teacher['accuracy'] * 100:.2f}", f"{teacher['ece']:.4f}",
                              f"{teacher['size']:.1f}", f"{teacher['latency']:.0f}", "-"]]
    gaps: list[list[Any]] = []
    met = 0
    for hidden in HIDDEN:
        results: dict[str, list[dict[str, float]]] = {"labels": [], "distilled": []}
        for seed in SEEDS:
            for kind in results:
                out = work / f"{task}-{hidden}-{kind}-{seed}"
                opts = BuildOptions(task=task, out=out, formats="onnx", hidden=(hidden,),
                                    seed=seed, name=f"{task}-{kind}",
                                    distill=(DistillSpec(cloud, spec.temperature, spec.alpha,
                                                         spec.mixup)
                                             if kind == "distilled" else None))
                build_package(opts)
                results[kind].append(measure(out, "onnx-int8", cloud, fresh))
                print(task, hidden, seed, kind, results[kind][-1], flush=True)
        for kind, rs in results.items():
            rows.append([task, f"student {kind}, int8", str(hidden), spread(rs, "accuracy"),
                         f"{mean(rs, 'ece'):.4f}", f"{mean(rs, 'size'):.1f}",
                         f"{mean(rs, 'latency'):.0f}", spread(rs, "local")])
        lab, dis = mean(results["labels"], "accuracy"), mean(results["distilled"], "accuracy")
        gap = teacher["accuracy"] - lab
        per_seed = [(d["accuracy"] - la["accuracy"]) / gap
                    for d, la in zip(results["distilled"], results["labels"], strict=True)]
        sem = statistics.stdev(per_seed) / np.sqrt(len(SEEDS))
        closed = f"{(dis - lab) / gap:.0%} (± {sem:.0%})" if gap > 0 else "no gap"
        ok = gap > 0 and (dis - lab) / gap >= 0.5
        met += ok
        gaps.append([task, "test", len(get_task(task).split().y_test), str(hidden),
                     f"{teacher['accuracy'] * 100:.2f}", f"{lab * 100:.2f}",
                     f"{dis * 100:.2f}", f"{gap * 100:.2f}", closed, "yes" if ok else "no"])
        if fresh is not None:
            lab_f, dis_f = mean(results["labels"], "fresh"), mean(results["distilled"], "fresh")
            gap_f = teacher["fresh"] - lab_f
            per_f = [(d["fresh"] - la["fresh"]) / gap_f
                     for d, la in zip(results["distilled"], results["labels"], strict=True)]
            sem_f = statistics.stdev(per_f) / np.sqrt(len(SEEDS))
            ok_f = gap_f > 0 and (dis_f - lab_f) / gap_f >= 0.5
            gaps.append([task, "fresh windows", len(fresh[1]), str(hidden),
                         f"{teacher['fresh'] * 100:.2f}", f"{lab_f * 100:.2f}",
                         f"{dis_f * 100:.2f}", f"{gap_f * 100:.2f}",
                         f"{(dis_f - lab_f) / gap_f:.0%} (± {sem_f:.0%})" if gap_f > 0
                         else "no gap", "yes" if ok_f else "no"])
    return rows, gaps, met


def main() -> None:
    """Choose the settings on validation, run every task and write the section."""
    rows: list[list[Any]] = []
    gaps: list[list[Any]] = []
    met = 0
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        clouds = {task: build_cloud_package(CloudOptions(task=task,
                                                         out=work / f"{task}-cloud")).path
                  for task in TASKS}
        best, sweep_rows = sweep(clouds)
        assert best.spec is not None
        spec = best.spec
        for task in TASKS:
            r, g, m = run_task(task, clouds[task], spec, work)
            rows += r
            gaps += g
            met += m
    same = (spec.temperature, spec.alpha, spec.mixup) == (DEFAULT.temperature, DEFAULT.alpha,
                                                          DEFAULT.mixup)
    n_val = {t: len(get_task(t).calib_pool()[1]) for t in TASKS}
    flags = (f"--distill-temperature {DEFAULT.temperature:g} --alpha {DEFAULT.alpha:g} "
             f"--distill-mixup {DEFAULT.mixup:g}")
    body = f"""
`scripts/bench_distill.py`. Teacher: the cloud ensemble (`models build --profile cloud`,
5 MLPs of 256 hidden units, fp32). Students: one hidden layer of 8 or 16 units.

**Choosing the settings on validation, not test.** Each candidate below trains the
students in process (fp32, 40 epochs of SGD, seeds {SWEEP_SEEDS[0]}–{SWEEP_SEEDS[-1]}, the
same code as `models build`) and is scored on the validation samples, the calibration
pool ({n_val['digits']} digits samples, {n_val['vibration']} vibration windows: the
420-window split plus the task's extra simulated calibration windows); the test split is
not touched. "mixup" adds a transfer set: every epoch, as many mixup inputs
(λ·a + (1 − λ)·b of two random training inputs, λ ~ U(0, 1)) as training rows, labelled
by the teacher's soft targets alone. That doubles the SGD steps per epoch, so the sweep
also has a labels-only student with 80 epochs. Validation accuracy %, mean over seeds:

{md_table(["candidate", "digits h8", "digits h16", "vibration h8", "vibration h16",
           "mean"], sweep_rows)}

Chosen (best mean among the distilled candidates): **{best.name}**
({"the CLI defaults" if same else "NOT the CLI defaults: update DistillSpec"}:
`{flags}`).

**Test split.** With the chosen setting, every student is built twice through the real
pipeline with the same seeds ({SEEDS[0]}–{SEEDS[-1]}) and the same 40 epochs (no early
stopping for either): on labels only, and with `--distill-from` the teacher. Figures are
the int8 ONNX variant on the held-out test split (digits: 359 samples, one sample = 0.28
point; vibration: 700 samples), mean ± sd over the {len(SEEDS)} seeds. "Local share" is the
cascade against the teacher: τ chosen on the calibration pool so the cascade loses at
most {DEFAULT_MAX_LOSS:.1%} against the teacher alone, share answered on the device at that τ on
the test split. Latency: batch 1, median, one thread.

{md_table(["task", "model", "hidden", "accuracy %", "ECE", "size KiB", "latency µs",
           "local share % at same target"], rows)}

Share of the teacher–student gap that distillation closes (mean accuracy over seeds; in
brackets the standard error of the mean of the per-seed shares):

{md_table(["task", "evaluated on", "n", "hidden", "teacher %", "labels only %",
           "distilled %", "gap (points)", "gap closed", "≥ 50 %"], gaps)}

Target (closing at least half of the gap, on the test split): met in {met} of
{len(TASKS) * len(HIDDEN)} settings. The vibration rows "fresh windows" evaluate the same
packages on the 14 000 simulated windows of the cascade benchmark (a seed used for
nothing else): there the teacher's lead is measured with a fifth of the test split's
sampling error (compare the teacher's accuracy on both; docs/bench/cascade.md shows the
same for the cascade), so those rows are the better estimate of the share closed; they
are reported beside the test rows, not instead of them. The gaps
are one to three points and the test splits small, so a seed moves a figure by a few
tenths of a point; the ± columns show how much. A student with more units (the device
default, 64) has almost no gap to close on digits, which is why these tables use 8 and
16 units. Early stopping on the validation samples was tried while preparing this and
not adopted: on validation loss it stopped after about ten epochs (the loss rises from
growing over-confidence while accuracy still improves), and on the 216-sample digits
validation accuracy the stopping epoch jumped between 1 and 70 from seed to seed.
"""
    path = write_section("distill", "Distillation from the cloud model", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
