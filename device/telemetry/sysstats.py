"""CPU, memory, temperature and uptime from /proc and /sys, where the platform has them.

Read directly rather than through psutil so the device image stays small; anything a
platform does not expose (no thermal zone in a container, no /proc on macOS) is None.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["SystemSampler"]

_PROC_START = time.monotonic()


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs."""
    text = _read("/proc/stat")
    if not text:
        return None
    fields = [int(v) for v in text.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0])  # kB
    return out


def _rss_kb() -> int | None:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def _temperature_c() -> float | None:
    """The hottest thermal zone (a Pi has one: the SoC)."""
    best: float | None = None
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*/temp")):
        text = _read(str(zone))
        if text and text.strip().lstrip("-").isdigit():
            value = int(text.strip()) / 1000.0
            best = value if best is None else max(best, value)
    return best


class SystemSampler:
    """Samples system figures; CPU % is over the time since the previous sample."""

    def __init__(self) -> None:
        self._last_cpu = _cpu_times()

    def sample(self) -> dict[str, float | int | None]:
        """One reading for the ``system`` section of a metrics message."""
        cpu = _cpu_times()
        cpu_pct: float | None = None
        if cpu and self._last_cpu and cpu[1] > self._last_cpu[1]:
            cpu_pct = 100.0 * (cpu[0] - self._last_cpu[0]) / (cpu[1] - self._last_cpu[1])
        self._last_cpu = cpu
        mem = _meminfo()
        uptime_text = _read("/proc/uptime")
        rss = _rss_kb()
        total = mem.get("MemTotal")
        avail = mem.get("MemAvailable")
        return {
            "cpu_percent": round(cpu_pct, 1) if cpu_pct is not None else None,
            "load1": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "mem_total_mb": round(total / 1024, 1) if total else None,
            "mem_used_mb": round((total - avail) / 1024, 1) if total and avail else None,
            "rss_mb": round(rss / 1024, 1) if rss else None,
            "temperature_c": _temperature_c(),
            "uptime_s": float(uptime_text.split()[0]) if uptime_text else None,
            "process_uptime_s": round(time.monotonic() - _PROC_START, 1),
        }
