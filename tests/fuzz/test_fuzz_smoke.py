"""A short coverage-guided run of every fuzz target inside ``make test`` (``make fuzz``
runs the same for minutes). A crash fails the test and leaves its input in
``tests/fuzz/corpus/<target>/crash-*`` for the replay test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(240)]


def test_every_fuzz_target_runs_briefly_without_a_crash() -> None:
    seconds = os.environ.get("EDGEFLEET_FUZZ_SECONDS", "1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz"), "--seconds", seconds],
                          cwd=ROOT, capture_output=True, text=True, timeout=230, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ok", "CRASH"))]
    from tests.fuzz.targets import TARGETS

    assert len(lines) == len(TARGETS)
