"""Shared by every benchmark script: the machine description and where results go.

Each benchmark writes its own section to ``docs/bench/<topic>.md`` (so scripts can run
alone), and ``scripts/bench_all.py`` (``make bench``) runs them all and assembles
``docs/benchmarks.md``. Results are ratios measured side by side in one run.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTIONS = DOCS / "bench"


def cpu_name() -> str:
    """The CPU model string from /proc/cpuinfo (or the platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line naming the machine a benchmark ran on."""
    return (f"{cpu_name()}, {os.cpu_count()} cores, {platform.machine()}, "
            f"Python {platform.python_version()}, {dt.date.today().isoformat()}")


def write_section(topic: str, title: str, body: str) -> Path:
    """Write ``docs/bench/<topic>.md`` with a heading and the machine line."""
    SECTIONS.mkdir(parents=True, exist_ok=True)
    path = SECTIONS / f"{topic}.md"
    path.write_text(f"## {title}\n\nMachine: {machine_description()}\n\n{body.strip()}\n")
    return path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


#: The x86 flags that decide int8 kernel speed (VNNI above all).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
#: Interleaved timing rounds: load from other processes hits every variant alike.
ROUNDS = 8


def cpu_flags() -> list[str]:
    """The int8-relevant x86 flags this CPU has (VNNI decides onnxruntime's int8 speed)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith(("flags", "Features"))), [])
    return [f for f in CPU_FLAGS if f in flags]


def interleaved_medians(calls: Mapping[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median milliseconds per call, timing every variant in each of ``ROUNDS`` rounds."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    per_round = max(1, runs // ROUNDS)
    for call in calls.values():
        for _ in range(2):
            call()  # warm caches and, for LiteRT, the resized tensors
    for _ in range(ROUNDS):
        for key, call in calls.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - t0)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}
