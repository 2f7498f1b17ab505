"""Distillation benchmark: teacher vs distilled student vs the same student on labels only.

For each task (digits, vibration) it builds the cloud ensemble (the teacher, fp32) with
``models build --profile cloud`` defaults, then for small students (one hidden layer of
8 and 16 units) and seeds 0-2 builds the same student twice through the real pipeline
(``build_package``, int8 ONNX): once on labels only, once with ``--distill-from`` the
teacher (K = 2, α = 0.5, the CLI defaults). Every int8 student is measured with
``models eval`` (accuracy, ECE, size, latency) and ``models cascade`` against the teacher
(τ chosen on the calibration split for ≤ 0.5 point loss; local share on the test split).
Writes ``docs/bench/distill.md``.

    .venv/bin/python scripts/bench_distill.py      # or: make bench
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.models.build import BuildOptions, build_package
from edgefleet.models.cascade import DEFAULT_MAX_LOSS, apply_cascade
from edgefleet.models.cloud import CloudOptions, build_cloud_package
from edgefleet.models.distill import DistillSpec
from edgefleet.models.evaluate import evaluate_package

TASKS = ("digits", "vibration")
HIDDEN = (8, 16)
SEEDS = (0, 1, 2)
SPEC = DistillSpec(Path("."))  # defaults: K, α


def measure(pkg: Path, variant: str, cloud: Path | None) -> dict[str, float]:
    """models eval of one variant, plus the cascade's local share against ``cloud``."""
    _, res = evaluate_package(pkg, runs=300)
    r = res[variant]
    out = {"accuracy": r["accuracy"], "ece": r["ece"], "size": r["size_bytes"] / 1024,
           "latency": r["latency_ms_p50"] * 1e3}
    if cloud is not None:
        rep = apply_cascade(pkg, cloud, max_loss=DEFAULT_MAX_LOSS, write=False)
        out["local"] = rep.test["local_share"]
        out["cascade_acc"] = rep.test["cascade_accuracy"]
    return out


def mean(rows: list[dict[str, float]], key: str) -> float:
    """Mean of one figure over seeds."""
    return statistics.fmean(r[key] for r in rows)


def spread(rows: list[dict[str, float]], key: str, scale: float = 100.0) -> str:
    """``mean (min–max)`` over seeds, in percent by default."""
    vals = [r[key] * scale for r in rows]
    return f"{statistics.fmean(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"


def run_task(task: str, work: Path) -> tuple[list[list[Any]], list[list[Any]]]:
    """Rows of the main table and of the gap-closure table for one task."""
    cloud = build_cloud_package(CloudOptions(task=task, out=work / f"{task}-cloud")).path
    teacher = measure(cloud, "onnx-fp32", None)
    rows: list[list[Any]] = [[task, "teacher (cloud ensemble, fp32)", "5×256",
                              f"{teacher['accuracy'] * 100:.2f}", f"{teacher['ece']:.4f}",
                              f"{teacher['size']:.1f}", f"{teacher['latency']:.0f}", "-"]]
    gaps: list[list[Any]] = []
    for hidden in HIDDEN:
        results: dict[str, list[dict[str, float]]] = {"labels": [], "distilled": []}
        for seed in SEEDS:
            for kind in results:
                out = work / f"{task}-{hidden}-{kind}-{seed}"
                opts = BuildOptions(task=task, out=out, formats="onnx", hidden=(hidden,),
                                    seed=seed, name=f"{task}-{kind}",
                                    distill=(DistillSpec(cloud, SPEC.temperature, SPEC.alpha)
                                             if kind == "distilled" else None))
                build_package(opts)
                results[kind].append(measure(out, "onnx-int8", cloud))
                print(task, hidden, seed, kind, results[kind][-1], flush=True)
        for kind, rs in results.items():
            rows.append([task, f"student {kind}, int8", str(hidden), spread(rs, "accuracy"),
                         f"{mean(rs, 'ece'):.4f}", f"{mean(rs, 'size'):.1f}",
                         f"{mean(rs, 'latency'):.0f}", spread(rs, "local")])
        lab, dis = mean(results["labels"], "accuracy"), mean(results["distilled"], "accuracy")
        gap = teacher["accuracy"] - lab
        closed = f"{(dis - lab) / gap:.0%}" if gap > 0 else "no gap"
        gaps.append([task, str(hidden), f"{teacher['accuracy'] * 100:.2f}", f"{lab * 100:.2f}",
                     f"{dis * 100:.2f}", f"{gap * 100:.2f}", closed])
    return rows, gaps


def main() -> None:
    """Run every task and write the section."""
    rows: list[list[Any]] = []
    gaps: list[list[Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for task in TASKS:
            r, g = run_task(task, Path(tmp))
            rows += r
            gaps += g
    body = f"""
`scripts/bench_distill.py`. Teacher: the cloud ensemble (`models build --profile cloud`,
5 MLPs of 256 hidden units, fp32). Students: one hidden layer of 8 or 16 units, built
twice with the same seeds (0, 1, 2) and the same 40 epochs of SGD: on labels only, and
with `--distill-from` the teacher at K = {SPEC.temperature:g}, α = {SPEC.alpha:g} (the CLI
defaults, picked from a four-point sweep (K, α) ∈ {{(2, 0.5), (4, 0.7), (4, 0.9),
(8, 0.9)}} on the same splits, so slightly optimistic). Student figures are the int8 ONNX
variant on the held-out test split (digits: 359 samples, one sample = 0.28 point;
vibration: 700 samples), mean (min–max) over the three seeds. "Local share" is the
cascade against the teacher: τ chosen on the calibration split so the cascade loses at
most {DEFAULT_MAX_LOSS:.1%} against the teacher alone, share answered on the device at that τ on
the test split. Latency: batch 1, median, one thread.

{md_table(["task", "model", "hidden", "accuracy %", "ECE", "size KiB", "latency µs",
           "local share % at same target"], rows)}

Share of the teacher–student gap that distillation closes (mean accuracy over seeds):

{md_table(["task", "hidden", "teacher %", "labels only %", "distilled %", "gap (points)",
           "gap closed"], gaps)}

Reading: the target is closing at least half of the gap. The gaps are small (one to
three points) and the test splits small, so a seed moves a figure by a few tenths of a
point; the spread columns show how much. A student with more units (the device
default, 64) has almost no gap to close on digits, which is why these tables use 8 and
16 units.
"""
    path = write_section("distill", "Distillation from the cloud model", body)
    print(path.read_text())


if __name__ == "__main__":
    main()
