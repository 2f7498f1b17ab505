"""``models eval``: accuracy, calibration, size and latency of every variant in a package.

Everything is measured on the task's fixed held-out test split, after verifying the
package's hashes, so the numbers describe exactly the files a device would run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import check_golden, normalize
from edgefleet.device.runtime.manifest import Manifest, load_package
from edgefleet.device.runtime.mlp import softmax
from edgefleet.models.core.calibration import expected_calibration_error
from edgefleet.models.core.tasks import get_task

__all__ = ["evaluate_package", "median_latency_ms"]


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


def evaluate_package(root: Path | str, runs: int = 200) -> tuple[Manifest, dict[str, Any]]:
    """Verify ``root`` and measure each variant; returns the manifest and ``{variant: metrics}``."""
    root = Path(root)
    manifest = load_package(root)
    task = get_task(manifest.task)
    split = task.split()
    x = normalize(split.x_test, manifest.normalization)
    y = split.y_test
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
