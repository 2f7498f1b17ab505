"""``python -m tests.support.crash_at STEP ARGS...``: ``edgefleet-agent ARGS...`` that
SIGKILLs itself at update step STEP (the power-loss test's launcher; test-only).

It arms :data:`edgefleet.device.updates.installer.checkpoint_hook` in this process,
which is the only way to arm it: nothing a deployed device reads can.
"""

from __future__ import annotations

import os
import signal
import sys

from edgefleet.device.agent.cli import main
from edgefleet.device.updates import installer


def _arm(step: str) -> None:
    if step not in installer.FAULT_STEPS:
        raise SystemExit(f"unknown step {step!r} (one of {', '.join(installer.FAULT_STEPS)})")

    def kill_at(at: str) -> None:
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)

    installer.checkpoint_hook = kill_at


if __name__ == "__main__":
    _arm(sys.argv.pop(1))
    main()
