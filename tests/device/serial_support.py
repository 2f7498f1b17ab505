"""A socat pty pair whose links can be removed and recreated (USB unplug and replug)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path


class PtyPair:
    """``socat pty,link=A pty,link=B``: bytes written to A come out of B, raw 8-bit."""

    def __init__(self, folder: Path) -> None:
        self.a = folder / "sensor-side"
        self.b = folder / "device-side"
        self.proc: subprocess.Popen[bytes] | None = None

    def plug(self, timeout: float = 10.0) -> PtyPair:
        socat = shutil.which("socat")
        assert socat, "socat is a system dependency (scripts/install-system-deps.sh)"
        self.proc = subprocess.Popen(
            [socat, f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not (self.a.exists() and self.b.exists()):
            assert self.proc.poll() is None, "socat exited"
            assert time.monotonic() < deadline, "socat did not create its ptys"
            time.sleep(0.02)
        return self

    def unplug(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
        for link in (self.a, self.b):  # socat removes them on SIGTERM; be sure
            link.unlink(missing_ok=True)


def wait_until(cond, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll ``cond()`` until true; fail the test with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
