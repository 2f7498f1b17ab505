"""Predictor overhead: its median latency against the bare runtime call, side by side.

The two are timed in alternating blocks within one run on the same loaded model and the
same input, so a noisy neighbour on a shared CPU slows both alike and the ratio stays
meaningful. The bare call is the backend's ``run_raw`` (onnxruntime's session run with a
reused ``RunOptions``; LiteRT ``set_tensor + invoke + get_tensor``) on an input already
normalized and quantized; the Predictor's time includes validation, normalization,
quantization, temperature softmax and metrics. A third series times the same sample
through :class:`~edgefleet.device.inference.cascade.HybridPredictor` answering locally (τ = 0, no
scorer), i.e. what the cascade adds on top of the Predictor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.runtime.backends import DEFAULT_THREADS
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import load_package
from edgefleet.device.runtime.predictor import BACKENDS, Predictor

__all__ = ["bench_backend", "bench_package"]


def _timed_block(fn: Callable[[Any], Any], arg: Any, n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fn(arg)
        out.append(clock() - t0)


def bench_backend(package: Path | str, backend: str, *, runs: int = 2000, block: int = 100,
                  threads: int = DEFAULT_THREADS) -> dict[str, float | str]:
    """``{variant, predictor_ms_p50, raw_ms_p50, ratio, cascade_ms_p50}`` for one backend
    at batch 1."""
    from edgefleet.device.inference.cascade import FallbackConfig, HybridPredictor

    metrics = Metrics()
    pred = Predictor.load(package, backend=backend, threads=threads, metrics=metrics)
    hybrid = HybridPredictor(pred, FallbackConfig(threshold=0.0), None, metrics)
    m = pred.manifest
    x = np.asarray(m.golden[0].input if m.golden else np.zeros(m.input.shape),
                   dtype=np.float32)
    feed = pred.backend.prepare(normalize(x.reshape(1, -1), m.normalization))
    raw_fn = pred.backend.run_raw
    warm = max(block, 50)
    _timed_block(pred.predict, x, warm, [])
    _timed_block(raw_fn, feed, warm, [])
    _timed_block(hybrid.predict, x, warm, [])
    t_pred: list[float] = []
    t_raw: list[float] = []
    t_casc: list[float] = []
    for _ in range(max(1, runs // block)):
        _timed_block(raw_fn, feed, block, t_raw)
        _timed_block(pred.predict, x, block, t_pred)
        _timed_block(hybrid.predict, x, block, t_casc)
    p50_pred = float(np.median(t_pred)) * 1e3
    p50_raw = float(np.median(t_raw)) * 1e3
    return {"variant": pred.variant, "predictor_ms_p50": p50_pred, "raw_ms_p50": p50_raw,
            "ratio": p50_pred / p50_raw, "cascade_ms_p50": float(np.median(t_casc)) * 1e3}


def bench_package(package: Path | str, *, backends: tuple[str, ...] = BACKENDS,
                  runs: int = 2000, threads: int = DEFAULT_THREADS) -> dict[str, Any]:
    """:func:`bench_backend` for every backend the package has a variant for."""
    formats = {v.format for v in load_package(package).variants.values()}
    return {b: bench_backend(package, b, runs=runs, threads=threads)
            for b in backends if b in formats}
