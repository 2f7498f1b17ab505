"""Shared by every benchmark script: the machine description and where results go.

Each benchmark writes its own section to ``docs/bench/<topic>.md`` (so scripts can run
alone), and ``scripts/bench_all.py`` (``make bench``) runs them all and assembles
``docs/benchmarks.md``. Results are ratios measured side by side in one run.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

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
