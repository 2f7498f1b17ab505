"""Quantization benchmark: fp32 vs int8 in onnxruntime and LiteRT, side by side in one run.

Two models: the digits MLP (built by the real ``models build`` pipeline, so accuracy is
defined) and a MobileNetV1-class vision network with random weights (latency and size do
not depend on weight values; see ``edgefleet.models.build.vision``). Both runtimes run the same
function from the same weights. Latency is the bare runtime call (``run_raw``) on an
already prepared input, timed in interleaved rounds so that load from other processes
on a shared machine hits every variant alike. Writes ``docs/bench/quant.md``.

    .venv/bin/python scripts/bench_quant.py      # or: make bench
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (
    CPU_FLAGS,
    ROUNDS,
    cpu_flags,
    interleaved_medians,
    md_table,
    write_section,
)

from edgefleet.device.runtime.backends import InferenceBackend, open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import Variant
from edgefleet.device.runtime.mlp import MLP, load_params
from edgefleet.models.build.pipeline import BuildOptions, build_package
from edgefleet.models.build.tflite_export import export_tflite_fp32
from edgefleet.models.build.vision import (
    MobileNetSpec,
    export_vision_variants,
    synthetic_images,
)
from edgefleet.models.core.tasks import get_task

#: Intra-op threads for every table: one, as on a device busy with other work, and because
#: on a loaded shared machine a 2-thread pool mostly measures contention.
THREADS = 1
#: The extra batch-1 measurement of the vision model's shipped variants and fp32 baselines.
MORE_THREADS = os.cpu_count() or 2
SHIPPED = ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")
VISION = MobileNetSpec(input_size=128, width=1.0, n_classes=1000)
#: Extra onnxruntime int8 encodings, to show which int8 kernels the runtime runs best here.
EXTRA_ONNX: list[tuple[str, dict[str, Any]]] = [
    ("onnx-int8-u8", {"activations": "uint8"}),
    ("onnx-int8-qop", {"quant_format": "qoperator"}),
]
DESCRIBE = {
    "onnx-fp32": "fp32",
    "onnx-int8": "int8 QDQ, s8 act., per-channel s8 weights (shipped)",
    "onnx-int8-u8": "int8 QDQ, u8 activations",
    "onnx-int8-qop": "int8 QOperator (QLinearConv), s8 act.",
    "tflite-fp32": "fp32 (XNNPACK)",
    "tflite-int8": "full-integer int8, int8 in/out (shipped)",
}
#: (timed runs at batch 1, timed runs at batch 32) per variant and model.
RUNS = {"digits": (400, 200), "vision": (80, 16)}


def measure(root_of: dict[str, Path], variants: dict[str, Variant], x1: np.ndarray,
            x32: np.ndarray | None, runs: tuple[int, int],
            threads: int = THREADS) -> dict[str, dict[str, float]]:
    """Size and median batch-1 / batch-32 (unless ``x32`` is None) latency of each variant."""
    backends: dict[str, InferenceBackend] = {
        k: open_backend(root_of[k], v, threads=threads) for k, v in variants.items()}
    res: dict[str, dict[str, float]] = {
        k: {"size": float((root_of[k] / v.file).stat().st_size)} for k, v in variants.items()}
    for batch, x, n in (("b1", x1, runs[0]), ("b32", x32, runs[1])):
        if x is None:
            continue
        feeds = {k: b.prepare(x) for k, b in backends.items()}
        calls = {k: functools.partial(b.run_raw, feeds[k]) for k, b in backends.items()}
        for k, ms in interleaved_medians(calls, n).items():
            res[k][batch] = ms
    return res


def digits(tmp: Path) -> tuple[dict[str, dict[str, float]], int, str]:
    """Build the digits package, add a TFLite fp32 baseline and measure every variant."""
    pkg = build_package(BuildOptions(task="digits", out=tmp / "digits", formats="all", seed=0))
    model = MLP.from_params(load_params(pkg.path / "params.npz"))
    export_tflite_fp32(model, tmp / "digits_fp32.tflite")
    variants = dict(pkg.manifest.variants)
    variants["tflite-fp32"] = Variant(file="digits_fp32.tflite", format="tflite",
                                      precision="fp32")
    root_of = {k: tmp if k == "tflite-fp32" else pkg.path for k in variants}
    split = get_task("digits").split()
    x = normalize(split.x_test, pkg.manifest.normalization)
    res = measure(root_of, variants, x[:1], x[:32], RUNS["digits"])
    for k, v in variants.items():
        logits = open_backend(root_of[k], v, threads=THREADS).run(x)
        res[k]["quality"] = float(np.mean(logits.argmax(1) == split.y_test))
    return res, len(split.y_test), "-".join(str(n) for n in model.sizes)


def vision(tmp: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], int,
                                float]:
    """Export the MobileNet in every variant and measure; quality = argmax agreement.

    Also returns batch-1 latency of the shipped variants at ``MORE_THREADS`` threads."""
    exp = export_vision_variants(VISION, tmp / "vision", seed=0, extra_onnx=EXTRA_ONNX)
    x = synthetic_images(64, VISION.input_size, seed=123)
    root_of = dict.fromkeys(exp.variants, exp.root)
    res = measure(root_of, exp.variants, x[:1], x[:32], RUNS["vision"])
    more = measure(root_of, {k: exp.variants[k] for k in SHIPPED}, x[:1], None,
                   RUNS["vision"], threads=MORE_THREADS)
    logits = {k: open_backend(exp.root, v, threads=THREADS).run(x)
              for k, v in exp.variants.items()}
    fp32_gap = float(np.max(np.abs(logits["onnx-fp32"] - logits["tflite-fp32"])))
    for k in exp.variants:
        ref = logits["onnx-fp32" if k.startswith("onnx") else "tflite-fp32"]
        res[k]["quality"] = float(np.mean(logits[k].argmax(1) == ref.argmax(1)))
    return res, more, exp.n_params, fp32_gap


def rows_for(model: str, res: dict[str, dict[str, float]], quality_fmt: str) -> list[list[object]]:
    out: list[list[object]] = []
    for k in sorted(res, key=lambda k: (k.split("-")[0], k != f"{k.split('-')[0]}-fp32", k)):
        r = res[k]
        out.append([model, "onnxruntime" if k.startswith("onnx") else "LiteRT", f"`{k}`",
                    DESCRIBE[k], f"{r['size'] / 1024:,.1f}", f"{r['b1']:.3g}", f"{r['b32']:.3g}",
                    quality_fmt.format(r["quality"])])
    return out


def best_fp32(res: dict[str, dict[str, float]], batch: str) -> str:
    """The faster fp32 variant of either runtime at ``batch`` (the honest int8 baseline)."""
    return min(("onnx-fp32", "tflite-fp32"), key=lambda k: res[k][batch])


def ratio_rows(model: str, res: dict[str, dict[str, float]], target: bool) -> list[list[object]]:
    """int8 against the same runtime's fp32 and against the best fp32 of either runtime."""
    out: list[list[object]] = []
    best = {b: res[best_fp32(res, b)][b] for b in ("b1", "b32")}
    for k in sorted(res):
        if "int8" not in k:
            continue
        base = res["onnx-fp32" if k.startswith("onnx") else "tflite-fp32"]
        lat1, lat32 = res[k]["b1"] / best["b1"], res[k]["b32"] / best["b32"]
        same1, same32 = res[k]["b1"] / base["b1"], res[k]["b32"] / base["b32"]
        size = res[k]["size"] / base["size"]
        ok = [name for name, lat in (("batch 1", lat1), ("batch 32", lat32)) if lat <= 0.5]
        met = ("-" if not target else "no (size)" if size > 0.3 else
               "yes" if len(ok) == 2 else f"{ok[0]} only" if ok else "no")
        out.append([model, f"`{k}`", f"{lat1:.2f}", f"{lat32:.2f}", f"{same1:.2f}",
                    f"{same32:.2f}", f"{size:.2f}", met])
    return out


def target_verdict(vis: dict[str, dict[str, float]]) -> list[str]:
    """One sentence per runtime on the shipped int8 variant of the vision model."""
    out = []
    best = {b: best_fp32(vis, b) for b in ("b1", "b32")}
    out.append("Best fp32 (the baseline of these ratios): "
               + ", ".join(f"batch {b[1:]} `{k}` {vis[k][b]:.3g} ms" for b, k in best.items())
               + ".")
    for runtime, fp32, int8 in (("onnxruntime", "onnx-fp32", "onnx-int8"),
                                ("LiteRT", "tflite-fp32", "tflite-int8")):
        lat = {b: vis[int8][b] / vis[best[b]][b] for b in ("b1", "b32")}
        size = vis[int8]["size"] / vis[fp32]["size"]
        ok = [f"batch {b[1:]}" for b in lat if lat[b] <= 0.5]
        slower = [f"batch {b[1:]}" for b in lat if lat[b] > 1.0]
        out.append(
            f"{runtime} `{int8}`: latency vs best fp32 {lat['b1']:.2f} (batch 1) / "
            f"{lat['b32']:.2f} "
            f"(batch 32), size {size:.2f}: latency target "
            f"{'met at ' + ' and '.join(ok) if ok else 'NOT met'}, size target "
            f"{'met' if size <= 0.3 else 'NOT met'}"
            + (f"; int8 is SLOWER than the best fp32 at {' and '.join(slower)}"
               if slower else "") + ".")
    for k in sorted(vis):
        if k.startswith("onnx-int8-") and vis[k]["b32"] > vis["onnx-fp32"]["b32"]:
            out.append(f"`{k}` ({DESCRIBE[k]}) is SLOWER than fp32 here: "
                       f"{vis[k]['b32'] / vis['onnx-fp32']['b32']:.2f}x at batch 32.")
    fastest = min((k for k in vis if k.startswith("onnx-int8")), key=lambda k: vis[k]["b32"])
    out.append(f"Fastest onnxruntime int8 encoding here at batch 32: `{fastest}` "
               f"({vis[fastest]['b32'] / vis['onnx-fp32']['b32']:.2f}x fp32).")
    return out


def main() -> int:
    """Measure both models, then write the section."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_quant.") as d:
        tmp = Path(d)
        print("digits: building package and measuring", flush=True)
        dig, n_test, layers = digits(tmp)
        print(f"vision: exporting {VISION.label} and measuring", flush=True)
        vis, more, n_params, fp32_gap = vision(tmp)
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()[0]
    flags = cpu_flags()
    vnni = any("vnni" in f for f in flags)
    header = ["model", "runtime", "variant", "what", "size KiB", "p50 batch 1 ms",
              "p50 batch 32 ms", "accuracy / argmax agreement"]
    table = md_table(header, rows_for("digits MLP", dig, "acc {:.3f}")
                     + rows_for(VISION.label, vis, "agree {:.2f}"))
    ratios = md_table(["model", "int8 variant", "latency b1 / best fp32",
                       "latency b32 / best fp32", "b1 / same runtime fp32",
                       "b32 / same runtime fp32", "size",
                       "target met (lat vs best fp32 ≤ 0.5, size ≤ 0.3)"],
                      ratio_rows("digits MLP", dig, False)
                      + ratio_rows(VISION.label, vis, True))
    verdict = "\n".join(f"- {line}" for line in target_verdict(vis))
    threads_table = md_table(
        ["variant", f"p50 batch 1 ms, {THREADS} thread", f"p50 batch 1 ms, {MORE_THREADS} threads"],
        [[f"`{k}`", f"{vis[k]['b1']:.3g}", f"{more[k]['b1']:.3g}"] for k in SHIPPED])
    best_more = best_fp32(more, "b1")
    body = f"""
`scripts/bench_quant.py` (`make bench`). fp32 vs int8 of the same weights in onnxruntime
and in LiteRT (ai-edge-litert), intra-op threads = {THREADS} in both runtimes (a device
runs inference beside its agent; on this shared machine a pool of {MORE_THREADS} mostly
measures contention: see the thread table below). Latency: median of the bare runtime
call on a prepared input (int8 TFLite
gets an already quantized int8 tensor), 2 warm-up calls, then {ROUNDS} interleaved rounds; batch 1 /
batch 32 runs: digits {RUNS['digits'][0]} / {RUNS['digits'][1]}, vision {RUNS['vision'][0]} /
{RUNS['vision'][1]}. The whole script took {elapsed:.0f} s; 1-minute load average
{load_before:.1f} before and {load_after:.1f} after (the machine is shared, so absolute
times are noisy; interleaving keeps the ratios comparable).

CPU int8 flags: {', '.join(flags) or 'none of ' + ', '.join(CPU_FLAGS)}
({'VNNI present: onnxruntime and XNNPACK have int8 dot-product kernels' if vnni else
  'no VNNI: onnxruntime int8 falls back to slower AVX2 kernels'}).

- **digits MLP** ({layers}, built by `edgefleet models build`): accuracy on the
  {n_test}-sample held-out test split. The model is so small that per-call overhead
  dominates; its ratios say little about int8 arithmetic.
- **{VISION.label}** ({VISION.n_classes} classes, {n_params / 1e6:.1f} M parameters, random
  weights with batch-norm statistics set from synthetic images; defined once in tf-keras,
  ONNX converted by tf2onnx (`edgefleet.models.build.tf_convert.keras_to_onnx`)):
  "agree" is the fraction of 64 synthetic images whose int8 argmax equals the same
  runtime's fp32 argmax (a random network has small logit margins, so expect a trained
  one to agree more often). ONNX fp32 and TFLite fp32 logits differ by at most
  {fp32_gap:.1e}: both runtimes compute the same function.

{table}

Ratios int8 / fp32, same run. Latency is divided by the **best fp32 of either runtime**
(a slow fp32 baseline would flatter int8); the same-runtime ratio is shown beside it.
Size is against the same format's fp32 file:

{ratios}

Target (issue #3): int8/fp32 latency ≤ 0.5 and size ≤ 0.3 on the MobileNet-class model.
{verdict}

{VISION.label}, batch 1, {THREADS} vs {MORE_THREADS} intra-op threads (same run, measured
after the table above; load average as stated):

{threads_table}

At {MORE_THREADS} threads the best fp32 is `{best_more}` ({more[best_more]['b1']:.3g} ms);
`onnx-int8` / best fp32 = {more['onnx-int8']['b1'] / more[best_more]['b1']:.2f},
`tflite-int8` / best fp32 = {more['tflite-int8']['b1'] / more[best_more]['b1']:.2f}.
The previous version of this benchmark ran everything at 2 threads and divided by the same
runtime's fp32: its 13.7 ms onnxruntime fp32 was the 2-thread pool on a loaded 2-core
machine, not a slow graph (the import work measured the hand-made and the tf2onnx graph
at ≈ 3.2 ms each at one thread and load ≈ 2-5; {vis['onnx-fp32']['b1']:.3g} ms here at the
load above), so its batch-1 `onnx-int8` ratio of 0.13 was flattering: against the best
fp32 at one thread it is {vis['onnx-int8']['b1'] / vis[best_fp32(vis, 'b1')]['b1']:.2f}
in this run.
"""
    path = write_section("quant", "Quantization: fp32 vs int8 (onnxruntime and LiteRT)", body)
    print(f"wrote {path} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
