"""`make bench`: run every benchmark script and assemble docs/benchmarks.md in one go."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import DOCS, SECTIONS

HERE = Path(__file__).resolve().parent


def main() -> int:
    """Run ``scripts/bench_*.py`` (all but the helpers), then concatenate their sections.

    ``--assemble`` only rebuilds docs/benchmarks.md from the sections already written.
    """
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__, main.__doc__, sep="\n")
        return 0
    failed = []
    scripts = [] if "--assemble" in sys.argv else sorted(HERE.glob("bench_*.py"))
    for script in scripts:
        if script.name in {"bench_all.py", "bench_common.py"}:
            continue
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script)]) != 0:
            failed.append(script.name)
    parts = ["# Benchmarks\n\nAssembled by `make bench` from `docs/bench/*.md`. Every "
             "comparison is measured side by side in one run; each section names the machine "
             "it ran on (runs on this project's shared 2-core machines are noisy: read the "
             "ratios, not the absolute times).\n"]
    parts += [p.read_text() for p in sorted(SECTIONS.glob("*.md"))]
    (DOCS / "benchmarks.md").write_text("\n".join(parts))
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
