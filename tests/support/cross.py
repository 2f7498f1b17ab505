"""Emulated arm64 devices for tests: build/reuse the cached rootfs, run programs inside it.

Thin wrappers over ``cross/build_rootfs.sh`` and ``cross/run.sh`` (the same scripts an
operator runs). An end-to-end test starts an emulated agent with :func:`device_argv`::

    rootfs = ensure_rootfs()
    proc = subprocess.Popen(device_argv(["edgefleet-agent", "run", ...], state=tmp / "pi1",
                                        hostname="pi1", binds={cfg_dir: "/etc/edgefleet"}))

Every device shares the host's network, so it reaches a broker or SuperLink on
127.0.0.1; ``state`` gives it its own persistent disk (an overlay over the rootfs).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
CROSS = REPO / "cross"
#: A cold build (debootstrap + wheels under emulation) takes minutes; a warm one seconds.
BUILD_TIMEOUT = 1800


def cross_available() -> str | None:
    """Why emulated devices cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "emulated devices need root (binfmt_misc, chroot, mount namespaces)"
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        return "qemu-user-static is not installed (scripts/install-system-deps.sh all)"
    return None


def require_cross() -> None:
    """Fail (never skip) when the machine cannot run emulated devices: the ARM tests are
    part of ``make test``, and ``make deps`` installs what they need."""
    reason = cross_available()
    if reason:
        pytest.fail(reason)


@cache
def ensure_rootfs() -> Path:
    """The cached rootfs, built or brought up to date with this checkout (locked)."""
    require_cross()
    out = subprocess.run([str(CROSS / "build_rootfs.sh")], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT, check=False)
    if out.returncode != 0:
        pytest.fail(f"cross/build_rootfs.sh failed:\n{out.stderr[-4000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def device_argv(command: Sequence[str], *, rootfs: Path | None = None,
                state: Path | None = None, hostname: str | None = None,
                binds: Mapping[Path, str] | None = None,
                ro_binds: Mapping[Path, str] | None = None,
                env: Mapping[str, str] | None = None, chdir: str | None = None,
                cpu: str | None = None) -> list[str]:
    """The argv that runs ``command`` inside an emulated device (for run or Popen).

    ``cpu`` is a QEMU CPU model; the default is a Raspberry Pi 4's Cortex-A72.
    """
    argv = [str(CROSS / "run.sh")]
    if cpu:
        argv += ["--cpu", cpu]
    if rootfs is not None:
        argv += ["--rootfs", str(rootfs)]
    if state is not None:
        argv += ["--state", str(state)]
    if hostname:
        argv += ["--hostname", hostname]
    if chdir:
        argv += ["--chdir", chdir]
    for host, guest in (binds or {}).items():
        argv += ["--bind", f"{host}:{guest}"]
    for host, guest in (ro_binds or {}).items():
        argv += ["--ro-bind", f"{host}:{guest}"]
    for name, value in (env or {}).items():
        argv += ["--env", f"{name}={value}"]
    return [*argv, "--", *command]


def run_in_device(command: Sequence[str], *, timeout: float = 600,
                  **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a fresh emulated device (writes vanish) and capture its output."""
    argv = device_argv(command, **kwargs)  # type: ignore[arg-type]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@cache
def parity_module() -> ModuleType:
    """``cross/parity.py`` (kept out of the installed package, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("edgefleet_cross_parity", CROSS / "parity.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
