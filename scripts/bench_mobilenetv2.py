"""MobileNetV2 0.35 96x96: a real architecture, imported by ``models import``, benchmarked.

``keras.applications.MobileNetV2(weights=None, alpha=0.35, input_shape=(96, 96, 3),
classes=10)`` (architecture only: nothing is downloaded) is trained for a few steps on
scikit-learn's digits upscaled to 96x96x3, so activations are not degenerate when int8
is calibrated; the model is not meant to be good. It is saved as ``.keras`` and packaged
by :func:`edgefleet.models.build.importer.import_model` (the function behind
``edgefleet models import``). Measured side by side in one run, batch 1, one thread:

- int8/fp32 latency in onnxruntime and LiteRT, int8 against the best fp32 of *either*
  runtime (a TFLite fp32 baseline is converted from the same SavedModel);
- file size int8/fp32;
- why int8 ONNX was slower than fp32: the package's fp32 graph re-quantized with the
  settings packages used before (QDQ, int8 activations, no ``quant_pre_process``) and each
  change alone, timed side by side, with the operators left in onnxruntime's optimized
  graph (``SessionOptions.optimized_model_filepath``);
- one DP-SGD step of the head (the package's ``head``: a dense layer from the embedding to
  10 classes; per-example clipping without materialized per-example gradients, noise,
  update: :func:`edgefleet.device.fl.dp_sgd.private_gradient` on a one-layer
  :class:`~edgefleet.device.runtime.mlp.MLP`) against one backbone inference;
- parity under QEMU arm64 (cortex-a72, cortex-a76) with ``cross/parity.py`` (needs root
  and the cached rootfs; the row says why when it cannot run).

Writes ``docs/bench/mobilenetv2.md``; ``--only head-cost`` builds and imports the same
model, times only the int8 backbones and the head step, and rewrites only the head
paragraph and its target line of that file.

    .venv/bin/python scripts/bench_mobilenetv2.py [--steps 200] [--no-arm] [--only head-cost]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SECTIONS, cpu_flags, interleaved_medians, md_table, write_section

from edgefleet.device.fl.dp_sgd import private_gradient
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.manifest import Variant, load_package
from edgefleet.device.runtime.mlp import MLP
from edgefleet.models.build.onnx_export import IMPORT_INT8

REPO = Path(__file__).resolve().parents[1]
CROSS = REPO / "cross"
SIZE = 96
ALPHA = 0.35
N_CALIB, N_EVAL = 300, 200
#: digits pixels are 0..16; the model sees x/8 - 1, MobileNet's [-1, 1].
SCALE, MEAN = 1 / 8, 1.0
RUNS_B1 = 160
HEAD_RUNS = 2000
CPUS = {"cortex-a72": "Raspberry Pi 4", "cortex-a76": "Raspberry Pi 5"}
ARM_SAMPLES = 100
TARGETS = {"latency": 0.6, "size": 0.3, "head": 0.10}


def digits_96() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as raw 96x96x3 images (0..16, bilinear upscale, grey in RGB)."""
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    imgs = d.images[order].astype(np.float32)
    big = zoom(imgs, (1, SIZE / 8, SIZE / 8), order=1).clip(0, 16).astype(np.float32)
    return np.repeat(big[..., None], 3, axis=-1), d.target[order].astype(np.int64)


def train_keras(x: np.ndarray, y: np.ndarray, steps: int, path: Path) -> float:
    """MobileNetV2 0.35 trained ``steps`` Adam steps (batch 32); saved to ``path``.

    Keras' MobileNetV2 uses batch-norm momentum 0.999, whose moving statistics would
    still be near their initial values after a few dozen steps; 0.9 lets inference-mode
    activations follow the trained weights. Returns the training seconds.
    """
    from edgefleet.models.build.tflite_export import _import_tf

    _import_tf()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, alpha=ALPHA,
                                           input_shape=(SIZE, SIZE, 3), classes=10)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    xs = x * SCALE - MEAN
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(y), 32, replace=False)
        model.train_on_batch(xs[idx], y[idx])
    seconds = time.perf_counter() - t0
    model.save(path)
    return seconds


#: Quantization settings compared on the same fp32 graph (minmax calibration): what
#: packages shipped before, each change alone, and what ``models import`` ships now.
SETTINGS: dict[str, dict[str, Any]] = {
    "QDQ, int8 act., no pre-process (before)": {},
    "QDQ, int8 act., pre-processed": {"preprocess": True},
    "QDQ, uint8 act., no pre-process": {"activations": "uint8"},
    "QDQ, uint8 act., pre-processed": {"activations": "uint8", "preprocess": True},
    "QOperator, uint8 act., pre-processed, 7-bit weights (now)": IMPORT_INT8,
}
#: Operators that compute in float (what a quantized graph should not keep).
FLOAT_OPS = ("Conv", "Add", "Mul", "MatMul", "Gemm", "Pad")


def optimized_ops(path: Path) -> dict[str, int]:
    """Operator counts of onnxruntime's optimized graph (the CPU provider's default level,
    which the device's ``OnnxBackend`` keeps) for ``path``."""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(td) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return dict(collections.Counter(n.op_type for n in onnx.load(
            str(Path(td) / "opt.onnx")).graph.node))


def settings_variants(fp32: Path, calib: np.ndarray, out: Path,
                      input_name: str) -> dict[str, Path]:
    """The package's fp32 graph quantized with each of :data:`SETTINGS`."""
    from edgefleet.models.build.onnx_export import quantize_onnx_int8

    paths = {}
    for i, (name, kw) in enumerate(SETTINGS.items()):
        paths[name] = quantize_onnx_int8(fp32, out / f"setting{i}.onnx", calib,
                                         input_name=input_name, method="minmax", **kw)
    return paths


def tflite_fp32(keras_path: Path, out: Path) -> Path:
    """The fp32 TFLite of the same model (LiteRT's fp32 baseline; packages ship int8)."""
    from edgefleet.models.build.tf_convert import _tf, saved_model_for

    tf = _tf()
    with saved_model_for(keras_path) as (sm_dir, _):
        out.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(sm_dir)).convert())
    return out


def head_step_ms(dim: int, n_classes: int, batch: int = 1) -> float:
    """Median ms of one DP-SGD step of the head on ``batch`` examples (fp32 NumPy): the
    clipped sum, one draw of Gaussian noise per parameter, the update."""
    rng = np.random.default_rng(0)
    head = MLP.init((dim, n_classes), seed=0)
    emb = rng.normal(size=(batch, dim)).astype(np.float32)
    label = rng.integers(0, n_classes, size=batch)
    times = []
    for _ in range(HEAD_RUNS // batch):
        t0 = time.perf_counter()
        grads = private_gradient(head, emb, label, 1.0, 1.0, float(batch), rng)
        for p, g in zip(head.params, grads, strict=True):
            p -= 0.05 * g
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def noise_ms(dim: int, n_classes: int) -> float:
    """Median ms of drawing the step's Gaussian noise alone (one value per parameter, the
    way :func:`~edgefleet.device.fl.dp_sgd.add_noise` draws it): the floor of a step."""
    rng = np.random.default_rng(0)
    times = []
    for _ in range(HEAD_RUNS):
        t0 = time.perf_counter()
        rng.normal(0.0, 1.0, size=(dim, n_classes))
        rng.normal(0.0, 1.0, size=n_classes)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def head_costs(dim: int) -> dict[str, float]:
    """The head step on one example and on 32, and the noise draw alone (ms)."""
    return {"one": head_step_ms(dim, 10), "batch32": head_step_ms(dim, 10, batch=32),
            "noise": noise_ms(dim, 10)}


def onnx_bytes(path: Path) -> dict[str, int]:
    """Where an ONNX file's bytes go: initializers by element type, and the rest (graph
    structure, node and tensor names)."""
    import onnx

    model = onnx.load(str(path))
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(t.data_type).lower()
        n = int(np.prod(t.dims)) if t.dims else 1
        out[kind] = out.get(kind, 0) + n * onnx.helper.tensor_dtype_to_np_dtype(
            t.data_type).itemsize
    out["other"] = path.stat().st_size - sum(out.values())
    return out


def arm_parity(pkg: Path, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], str | None]:
    """cross/parity.py on both architectures per emulated CPU, or why it could not run."""
    if os.geteuid() != 0:
        return {}, "needs root (binfmt_misc, chroot)"
    current = Path(os.environ.get("EDGEFLEET_CROSS_CACHE", Path.home() / ".cache/edgefleet/cross"))
    key = subprocess.run([str(CROSS / "build_rootfs.sh"), "--key"], capture_output=True,
                         text=True, check=True).stdout.strip()
    rootfs = current / f"rootfs-{key}"
    if not (rootfs / ".edgefleet-base").exists():
        return {}, f"no cached rootfs for key {key} (cross/build_rootfs.sh builds it, ~25 min)"
    sys.path.insert(0, str(CROSS))
    import parity

    out: dict[str, Any] = {}
    for cpu in CPUS:
        t0 = time.perf_counter()
        out[cpu] = parity.compare_data(pkg, x, y, rootfs=str(rootfs), cpu=cpu, source=REPO)
        out[cpu]["seconds"] = time.perf_counter() - t0
    return out, None


def build(tmp: Path, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[Path, float, float]:
    """Train the Keras model and import it into ``tmp/pkg``: (package, train s, import s)."""
    from edgefleet.models.build.importer import ImportOptions, import_model

    n_train = len(y) - N_CALIB - N_EVAL
    np.savez(tmp / "calib.npz", x=x[n_train:n_train + N_CALIB], y=y[n_train:n_train + N_CALIB])
    np.savez(tmp / "eval.npz", x=x[n_train + N_CALIB:], y=y[n_train + N_CALIB:])
    print(f"training MobileNetV2 {ALPHA} for {steps} steps", flush=True)
    train_s = train_keras(x[:n_train], y[:n_train], steps, tmp / "mnv2.keras")
    print("importing", flush=True)
    t0 = time.perf_counter()
    res = import_model(ImportOptions(model=tmp / "mnv2.keras", calibration=tmp / "calib.npz",
                                     eval=tmp / "eval.npz", out=tmp / "pkg", scale=SCALE,
                                     mean=(MEAN,), name="mobilenetv2-0.35-96"),
                       progress=lambda m: print(f"  {m}", flush=True))
    return res.path, train_s, time.perf_counter() - t0


def batch1_latency(backends: dict[str, Any], xn: np.ndarray) -> dict[str, float]:
    """Median ms of the bare runtime call at batch 1, variants interleaved."""
    print("timing batch 1, one thread", flush=True)
    calls = {k: functools.partial(b.run_raw, b.prepare(xn[:1])) for k, b in backends.items()}
    return interleaved_medians(calls, RUNS_B1)


def main() -> int:
    """Build, import, measure, write the section."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="training steps (batch 32)")
    ap.add_argument("--no-arm", action="store_true", help="skip the QEMU parity rows")
    ap.add_argument("--only", choices=["head-cost"],
                    help="measure only the head step against the int8 backbones and rewrite "
                         "only that text of docs/bench/mobilenetv2.md")
    args = ap.parse_args()
    from edgefleet.device.runtime.golden import normalize

    started, load_before = time.perf_counter(), os.getloadavg()
    x, y = digits_96()
    n_train = len(y) - N_CALIB - N_EVAL
    xe, ye = x[n_train + N_CALIB:], y[n_train + N_CALIB:]
    tmp = Path(tempfile.mkdtemp(prefix="bench_mnv2."))
    try:
        pkg, train_s, import_s = build(tmp, x, y, args.steps)
        manifest = load_package(pkg)
        assert manifest.head is not None and manifest.head.dim is not None
        variants: dict[str, Variant] = {str(k): v for k, v in manifest.variants.items()}
        xn = normalize(xe.reshape(len(xe), -1), manifest.normalization)
        if args.only == "head-cost":
            lat = batch1_latency({k: open_backend(pkg, variants[k], threads=1)
                                  for k in ("onnx-int8", "tflite-int8")}, xn)
            head = head_costs(manifest.head.dim)
            return only_head_cost(manifest, lat, head, load_before)
        tflite_fp32(tmp / "mnv2.keras", tmp / "model_fp32.tflite")
        variants["tflite-fp32"] = Variant(file="model_fp32.tflite", format="tflite",
                                          precision="fp32", input_shape=[SIZE, SIZE, 3])
        root_of = {k: tmp if k == "tflite-fp32" else pkg for k in variants}
        backends = {k: open_backend(root_of[k], v, threads=1) for k, v in variants.items()}
        size = {k: (root_of[k] / v.file).stat().st_size for k, v in variants.items()}
        acc = {k: float(np.mean(b.run(xn).argmax(1) == ye)) for k, b in backends.items()}
        print("quantizing with each compared setting", flush=True)
        xcal = normalize(x[n_train:n_train + N_CALIB].reshape(N_CALIB, -1),
                         manifest.normalization).reshape(-1, SIZE, SIZE, 3)
        fp32_var = manifest.variants["onnx-fp32"]
        diag_paths = settings_variants(pkg / fp32_var.file, xcal, tmp,
                                       fp32_var.input_name)
        for name, path in diag_paths.items():
            backends[name] = open_backend(tmp, fp32_var.model_copy(
                update={"file": path.name, "precision": "int8"}), threads=1)
        diag = {name: {"ops": optimized_ops(path), "size": path.stat().st_size,
                       "accuracy": float(np.mean(backends[name].run(xn).argmax(1) == ye))}
                for name, path in diag_paths.items()}
        diag["onnx-fp32"] = {"ops": optimized_ops(pkg / fp32_var.file)}
        lat = batch1_latency(backends, xn)
        head = head_costs(manifest.head.dim)
        anatomy = {k: onnx_bytes(pkg / variants[k].file) for k in ("onnx-fp32", "onnx-int8")}
        arm, arm_why = ({}, "skipped (--no-arm)") if args.no_arm else arm_parity(
            pkg, xe[:ARM_SAMPLES], ye[:ARM_SAMPLES])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed, load_after = time.perf_counter() - started, os.getloadavg()
    print(json.dumps({"size": size, "accuracy": acc, "latency_ms": lat, "head_ms": head,
                      "onnx_bytes": anatomy, "settings": diag, "arm": arm,
                      "arm_skipped": arm_why}, indent=1), flush=True)
    body = report(manifest, size, acc, lat, head, anatomy, diag, arm, arm_why,
                  {"train": train_s, "import": import_s, "total": elapsed},
                  load_before, load_after, args.steps, len(ye))
    path = write_section("mobilenetv2", "MobileNetV2 0.35 96x96: imported, int8 vs fp32, "
                         "head fine-tuning, arm64", body)
    print(f"wrote {path} in {elapsed:.0f} s")
    return 0


def only_head_cost(manifest: Any, lat: dict[str, float], head: dict[str, float],
                   load_before: tuple[float, ...]) -> int:
    """Rewrite the head paragraph and its target line of the written section, nothing else."""
    path = SECTIONS / "mobilenetv2.md"
    loads = "/".join(f"{v:.1f}" for v in load_before) + " before and " + "/".join(
        f"{v:.1f}" for v in os.getloadavg()) + " after"
    note = (f" Measured by `--only head-cost` in a run of its own (load average {loads}): "
            "the backbone time is that run's, not the table's.")
    print(json.dumps({"latency_ms": lat, "head_ms": head}, indent=1), flush=True)
    paragraph, bullet = head_text(manifest, lat, head, note)
    text = path.read_text()
    para = re.compile(r"\*\*Head fine-tuning cost per sample\.\*\*.*?(?=\n\n)", re.S)
    line = re.compile(r"^- one DP head step.*?(?=\n- |\n\n|\Z)", re.S | re.M)
    if not (para.search(text) and line.search(text)):
        print(f"{path} has no head paragraph to rewrite: run the whole script", file=sys.stderr)
        return 1
    text = para.sub(lambda _: paragraph, text, count=1)
    path.write_text(line.sub(lambda _: bullet, text, count=1))
    print(f"rewrote the head cost in {path}")
    return 0


def short(name: str) -> str:
    """The last two parts of a graph node or tensor name."""
    return name.rsplit("/", 2)[-2] + "/" + name.rsplit("/", 1)[-1] if "/" in name else name


def verdict(value: float, target: float) -> str:
    """The value against its target."""
    return f"{value:.3g} (target ≤ {target:g}: {'met' if value <= target else 'NOT met'})"


def head_text(manifest: Any, lat: dict[str, float], head: dict[str, float],
              note: str = "") -> tuple[str, str]:
    """The head cost paragraph and its line under "Targets"."""
    cut = manifest.head
    # the package's graphs have short names; the lineage keeps tf2onnx's for the cut
    names = manifest.lineage.get("model", {}).get("source_names") or {}
    node, emb = names.get("head_node", cut.node), names.get("embedding", cut.embedding)
    fastest_int8 = min(("onnx-int8", "tflite-int8"), key=lambda k: lat[k])
    backbone = lat[fastest_int8]
    ratio, ratio32 = head["one"] / backbone, head["batch32"] / 32 / backbone
    n_params = cut.dim * 10 + 10
    paragraph = f"""**Head fine-tuning cost per sample.** The package's head cut is
`{short(node)}` ({cut.op}) on `{short(emb)}`, embedding width {cut.dim}
(MobileNetV2 keeps 1280 channels in its last conv for alpha ≤ 1). One DP-SGD step of
that dense layer ({cut.dim}×10 + 10; `edgefleet.device.fl.dp_sgd.private_gradient`,
then the update), fp32 NumPy, median. Per-example gradients are not materialized:
the step takes each example's embedding a and logit gradient d (`MLP.dense_terms`), its
gradient norm from ‖a‖²·‖d‖² + ‖d‖² (float64) and the clipped sum as one matmul
Aᵀ·diag(c)·D; then {n_params:,} Gaussian noise values (float64, σ·C) and the update. On
one example: **{head['one']:.3g} ms**, against one backbone inference with the fastest
int8 variant (`{fastest_int8}`, {backbone:.3g} ms; the whole model is timed, the
{cut.dim}×10 head being a negligible part of it): {ratio:.2f}. Drawing the noise alone
takes {head['noise']:.3g} ms ({head['noise'] / head['one']:.0%} of the one-example step):
a fixed cost per step, one value per parameter whatever the batch, which DP-SGD cannot
skip and a real step pays once per Poisson batch. One step on a batch of 32 costs
{head['batch32']:.3g} ms, i.e. {head['batch32'] / 32:.3g} ms per sample, {ratio32:.3f} of
one backbone inference.{note}"""
    bullet = f"""- one DP head step on one example / one backbone inference:
  {verdict(ratio, TARGETS['head'])}; per sample in a batch of 32:
  {verdict(ratio32, TARGETS['head'])}"""
    return textwrap.fill(paragraph.replace("\n", " "), 90, break_long_words=False,
                         break_on_hyphens=False), bullet


def report(manifest: Any, size: dict[str, int], acc: dict[str, float], lat: dict[str, float],
           head: dict[str, float], anatomy: dict[str, dict[str, int]],
           diag: dict[str, dict[str, Any]], arm: dict[str, Any], arm_why: str | None,
           secs: dict[str, float],
           load_before: tuple[float, ...], load_after: tuple[float, ...], steps: int,
           n_eval: int) -> str:
    """The markdown section."""
    best_fp32 = min(("onnx-fp32", "tflite-fp32"), key=lambda k: lat[k])
    fastest_int8 = min(("onnx-int8", "tflite-int8"), key=lambda k: lat[k])
    runtime = {"onnx": "onnxruntime", "tflite": "LiteRT"}
    rows = [[runtime[k.split("-")[0]], f"`{k}`", f"{size[k] / 1024:,.0f}", f"{lat[k]:.3g}",
             f"{acc[k]:.3f}"] for k in ("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")]
    ratio_rows = []
    for k in ("onnx-int8", "tflite-int8"):
        same = k.replace("int8", "fp32")
        ratio_rows.append([f"`{k}`", f"{lat[k] / lat[same]:.2f}",
                           f"{lat[k] / lat[best_fp32]:.2f}", f"{size[k] / size[same]:.3f}"])
    lat_ratio = lat[fastest_int8] / lat[best_fp32]
    size_ratio = size[fastest_int8] / size[fastest_int8.replace("int8", "fp32")]
    head_paragraph, head_bullet = head_text(manifest, lat, head)
    kib = 1024
    anatomy_rows = [[f"`{k}`", *(f"{a.get(t, 0) / kib:,.0f}"
                                 for t in ("float", "int8", "int32", "other")),
                     f"{sum(a.values()) / kib:,.0f}"] for k, a in anatomy.items()]
    int8_file = anatomy["onnx-int8"]
    fp32_weights = anatomy["onnx-fp32"].get("float", 0)
    q_onnx = manifest.lineage.get("quantization", {}).get("onnx", {})
    method = q_onnx.get("method", "?")
    scores = ", ".join(f"{k} {v:.3f}" for k, v in q_onnx.get("method_scores_heldout", {}).items())

    def golden(verdict: str) -> str:
        return ("passes" if verdict == "passes"
                else "REFUSED " + verdict.rsplit("outputs ", maxsplit=1)[-1])

    def integer(ops: dict[str, int]) -> int:
        return sum(n for op, n in ops.items() if op.startswith("QLinear") or op == "QGemm")

    fp32_ops = diag["onnx-fp32"]["ops"]
    diag_rows = [[name, f"{lat[name]:.3g}", f"{lat[name] / lat['onnx-fp32']:.2f}",
                  f"{d['accuracy']:.3f}", f"{d['size'] / kib:,.0f}", integer(d["ops"]),
                  ", ".join(f"{d['ops'][op]} {op}" for op in FLOAT_OPS if d["ops"].get(op))
                  or "none",
                  d["ops"].get("QuantizeLinear", 0) + d["ops"].get("DequantizeLinear", 0),
                  d["ops"].get("Transpose", 0)]
                 for name, d in diag.items() if name != "onnx-fp32"]
    names = list(SETTINGS)
    before, s8_pre = names[0], names[1]
    before_ops, s8_ops = diag[before]["ops"], diag[s8_pre]["ops"]
    if arm:
        arm_rows = [[f"{cpu} ({CPUS[cpu]})", f"`{v}`",
                     f"{r['variants'][v]['argmax_agreement'] * 100:.1f} %",
                     f"{r['variants'][v]['max_abs_logit_diff']:.2e}",
                     f"{r['variants'][v]['accuracy_x86']:.3f}",
                     f"{r['variants'][v]['accuracy_arm64']:.3f}",
                     golden(r["variants"][v]["golden_arm64"])]
                    for cpu, r in arm.items() for v in r["variants"]]
        refused = sorted({f"`{v}`" for r in arm.values() for v, g in r["variants"].items()
                          if g["golden_arm64"] != "passes"})
        arm_text = (
            f"The first {ARM_SAMPLES} evaluation images through the package's `Predictor` "
            "(golden check included) natively and in the emulated device (`cross/parity.py`, "
            "the device running a copy of this checkout's `edgefleet` sources):\n\n"
            + md_table(["emulated CPU", "variant", "argmax agreement", "max abs Δ logit",
                        "accuracy x86-64", "accuracy arm64", "golden check on arm64"], arm_rows)
            + ("\n\n**The device refuses " + " and ".join(refused) + "**: its logits on the "
               "package's golden inputs differ from x86-64's by more than the package's golden "
               "check allows (its int8-gap rule, docs/model-package.md), so a Pi would not "
               "load it. The row shows the variant run straight through its backend, to show "
               "by how much it differs." if refused else "")
            + "\n\nSeconds per parity run (both architectures): "
            + ", ".join(f"{cpu} {r['seconds']:.0f} s" for cpu, r in arm.items()) + ".")
    else:
        arm_text = f"Not measured: {arm_why}."
    flags = ", ".join(cpu_flags()) or "none"
    return f"""
`scripts/bench_mobilenetv2.py`. `keras.applications.MobileNetV2(weights=None, alpha=0.35,
input_shape=(96, 96, 3), classes=10)` (architecture only, nothing downloaded), trained
{steps} Adam steps of batch 32 ({secs['train']:.0f} s) on scikit-learn's digits upscaled
to 96x96x3 so that int8 calibration sees realistic activations, saved as `.keras`
and packaged by `edgefleet models import` (`import_model`, {secs['import']:.0f} s;
calibration {N_CALIB} images, evaluation {n_eval}, `--scale 1/8 --mean 1`). The ONNX
calibration method chosen was `{method}` (held-out accuracy: {scores}). A LiteRT fp32
baseline is converted from the same SavedModel (packages ship only int8 TFLite).

Latency: batch 1, **one thread** in both runtimes, median of the bare runtime call on a
prepared input, {RUNS_B1} calls per variant in interleaved rounds. Whole script
{secs['total']:.0f} s; load average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in load_before)}
before and {'/'.join(f'{v:.1f}' for v in load_after)} after, on a shared 2-core machine
(absolute times are noisy; the ratios are taken side by side). CPU int8 flags: {flags}.

{md_table(["runtime", "variant", "size KiB", "p50 batch 1 ms (1 thread)",
           f"accuracy ({n_eval} eval images)"], rows)}

Ratios (same run). "vs best fp32" divides by the faster fp32 of either runtime
(`{best_fp32}`, {lat[best_fp32]:.3g} ms):

{md_table(["int8 variant", "latency / same runtime fp32", "latency / best fp32",
           "size / same format fp32"], ratio_rows)}

**Why `onnx-int8` was slower than fp32, and what changed.** The package's fp32 graph
quantized with the settings packages used before and with each change alone (minmax
calibration; the shipped variant's method is chosen by held-out accuracy, so its own row
above may differ a little), timed in the same interleaved run as the table above. The
operator columns count onnxruntime's *optimized* graph (`optimized_model_filepath`, the
CPU provider's default `ORT_ENABLE_ALL`, which the device's `OnnxBackend` keeps): its fp32
graph is {fp32_ops.get("Conv", 0)} `Conv` nodes with batch norm, ReLU6 and padding folded in.

{md_table(["settings", "p50 ms", "/ onnx-fp32", "accuracy", "size KiB",
           "integer kernels", "float ops left", "Q + DQ left", "Transpose"], diag_rows)}

Two things made the old variant slow, each visible in the counts:

1. **No `quant_pre_process`.** tf2onnx writes Keras' batch norm as separate `Mul`/`Add`
   nodes and `ZeroPadding2D` as `Pad`. In fp32, onnxruntime folds them into the
   convolutions when it loads the model; quantized first, every one of them got its own
   QuantizeLinear/DequantizeLinear pair, which blocks that folding, so they ran as float
   operators between int8 ones (before: {before_ops.get("Mul", 0)} `Mul`,
   {before_ops.get("Add", 0)} `Add`, {before_ops.get("Pad", 0)} `Pad` left).
   `quant_pre_process` (ONNX shape inference and onnxruntime's graph optimizations before
   quantization) folds them first, so only the convolutions, the residual adds and the
   dense layer are quantized.
2. **int8 activations on x86.** With int8 (S8S8) activations, onnxruntime's x86 CPU
   provider leaves, even after pre-processing, the {s8_ops.get("Add", 0)} residual `Add`s and
   {s8_ops.get("Conv", 0)} of the 1x1 convolutions as float DequantizeLinear -> op ->
   QuantizeLinear chains, and puts {s8_ops.get("Transpose", 0)} NHWC<->NCHW `Transpose`s
   between them and its NHWC int8 convolutions. With uint8
   activations (U8S8, onnxruntime's x86 fast path) every convolution becomes a
   `QLinearConv` and every add a `QLinearAdd`: one QuantizeLinear at the input, one
   DequantizeLinear before the logits.

What `models import` ships now (the last row, `IMPORT_INT8` in
`models/build/onnx_export.py`): pre-processed, uint8 activations, per-channel int8
weights, written as QOperator: the integer kernels are in the file, so
every device runs the same integer graph whatever its onnxruntime would fuse at load time,
and the file carries no Q/DQ nodes (smaller). Weights use 7 bits (`reduce_range`): x86
CPUs without VNNI compute u8×s8 in 16-bit pair sums that can saturate with 8-bit weights,
and would then not compute what the build machine computed. The lineage records every
setting (`quantization.onnx`).

Where the ONNX files' bytes go (KiB; initializers by element type, "other" = graph
structure and node/tensor names; tf2onnx's long names, e.g.
`StatefulPartitionedCall/.../block_16_project/Conv2D`, are shortened at import to `n0…`/`t0…`,
the originals kept in the lineage):

{md_table(["file", "float32 tensors", "int8 tensors", "int32 tensors (biases)",
           "other", "total"], anatomy_rows)}

The int8 weights are {int8_file.get("int8", 0) / max(fp32_weights, 1):.2f} of the fp32
weights, as expected; on a network this small (about {fp32_weights / 4 / 1e3:,.0f} k
parameters) the per-channel scales and zero points and the int32 biases keep the whole
file above a quarter of fp32.

{head_paragraph}

Targets (issue #16; reported, not asserted):
- int8/fp32 latency on the faster backend (`{fastest_int8}` against `{best_fp32}`):
  {verdict(lat_ratio, TARGETS['latency'])}
- size int8/fp32 (`{fastest_int8}`): {verdict(size_ratio, TARGETS['size'])}
{head_bullet}

### Parity under QEMU arm64

{arm_text}
"""


if __name__ == "__main__":
    sys.exit(main())
