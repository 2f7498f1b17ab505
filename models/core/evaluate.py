"""``models eval``: accuracy, calibration, size and latency of every variant in a package.

Everything is measured on the task's fixed held-out test split (an imported model: the
operator's evaluation ``.npz``), after verifying the package's hashes, so the numbers
describe exactly the files a device would run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.core.errors import UsageError
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import check_golden, normalize
from edgefleet.device.runtime.manifest import Manifest, load_package
from edgefleet.device.runtime.mlp import softmax
from edgefleet.models.core.calibration import expected_calibration_error
from edgefleet.models.core.tasks import get_task, task_names

__all__ = ["evaluate_package", "load_eval_npz", "median_latency_ms"]


def median_latency_ms(fn: Any, arg: Any, runs: int = 200, warmup: int = 20) -> float:
    """Median wall time of ``fn(arg)`` in milliseconds."""
    for _ in range(warmup):
        fn(arg)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        fn(arg)
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e3)


def load_eval_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` of an evaluation ``.npz`` (no pickles)."""
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz or "y" not in npz:
            raise UsageError(f"{path.name}: needs arrays 'x' and 'y', has {sorted(npz.files)}")
        return np.asarray(npz["x"], np.float32), np.asarray(npz["y"], np.int64)


def evaluate_package(root: Path | str, runs: int = 200,
                     data: Path | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Verify ``root`` and measure each variant; returns the manifest and ``{variant: metrics}``.

    Built-in tasks use their held-out test split; an imported model (``models import``)
    has no task data, so ``data`` names an ``.npz`` with ``x`` (raw inputs) and ``y``.
    """
    root = Path(root)
    manifest = load_package(root)
    if data is not None:
        x_raw, y = load_eval_npz(data)
        want = tuple(manifest.input.shape)
        if x_raw.shape[1:] != want:
            raise UsageError(f"{data.name}: x has shape {x_raw.shape}, the model takes "
                             f"(n, {', '.join(map(str, want))})")
    elif manifest.task in task_names():
        split = get_task(manifest.task).split()
        x_raw, y = split.x_test, split.y_test
    else:
        raise UsageError(f"task {manifest.task!r} has no built-in data: give --data EVAL.npz")
    x = normalize(x_raw.reshape(len(x_raw), -1), manifest.normalization)
    out: dict[str, Any] = {}
    preds: dict[str, np.ndarray] = {}
    for vname, var in sorted(manifest.variants.items()):
        key: str = vname
        backend = open_backend(root, var, threads=1)
        check_golden(manifest, key, backend)
        logits = backend.run(x)
        pred = preds[key] = logits.argmax(1)
        out[key] = {
            "accuracy": float(np.mean(pred == y)),
            "ece": expected_calibration_error(softmax(logits, manifest.temperature), y),
            "size_bytes": (root / var.file).stat().st_size,
            "latency_ms_p50": median_latency_ms(backend.run, x[:1], runs=runs),
            "per_class_accuracy": {
                manifest.labels[c]: float(np.mean(pred[y == c] == c)) for c in np.unique(y)
            },
        }
    if "onnx-fp32" in preds:
        for key in out:
            out[key]["agreement_with_fp32"] = float(np.mean(preds[key] == preds["onnx-fp32"]))
    return manifest, out
