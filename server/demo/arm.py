"""Emulated Raspberry Pis in ``edgefleet demo --arm-devices N``.

The last N agents of the demo run inside the arm64 device of ``cross/`` (a Debian
bookworm rootfs under QEMU user-mode emulation, see docs/arm64.md) instead of on the
host: the same enrollment bundle, the same ``agent.toml`` and the same sensor pty, but
the device's own aarch64 Python, onnxruntime, LiteRT and ``flower-supernode`` from
``/opt/edgefleet/venv``. The demo's work folder is bind-mounted at the same path inside
every device, so every path in ``agent.toml`` (state, keys, packages, the pty link)
means the same thing on both sides; the network is the host's loopback.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from edgefleet.device.core.errors import EdgefleetError

__all__ = ["DEVICE_VENV_BIN", "PATIENT_SUPERNODE", "EmulatedDevices", "arm_variant",
           "cross_dir"]

#: The device venv's programs (a real Pi installs into the same path).
DEVICE_VENV_BIN = Path("/opt/edgefleet/venv/bin")
#: ``flower-supernode`` with a task-claim window that survives emulation
#: (cross/patient_supernode.py, bind-mounted here in every emulated device).
PATIENT_SUPERNODE = Path("/usr/local/bin/flower-supernode-patient")
#: Emulated devices take turns with the two int8 runtimes, so both run on arm64.
ARM_VARIANTS = ("onnx-int8", "tflite-int8")
#: A cold rootfs build (debootstrap + wheels under emulation) takes minutes.
BUILD_TIMEOUT_S = 1800


class CrossError(EdgefleetError):
    """Emulated devices cannot run here; the message says what is missing."""

    exit_code = 70


def arm_variant(index: int) -> str:
    """The model variant of the ``index``-th emulated device (0-based)."""
    return ARM_VARIANTS[index % len(ARM_VARIANTS)]


def cross_dir() -> Path:
    """The checkout's ``cross/`` scripts (``EDGEFLEET_CROSS_DIR`` overrides)."""
    env = os.environ.get("EDGEFLEET_CROSS_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "cross"
    if not (path / "run.sh").is_file():
        raise CrossError(f"--arm-devices needs the cross/ scripts of an edgefleet checkout "
                         f"(not found at {path}; set EDGEFLEET_CROSS_DIR)")
    return path


class EmulatedDevices:
    """Builds (or reuses) the cached rootfs and gives each device its argv and disk."""

    def __init__(self, work: Path, cross: Path | None = None) -> None:
        self.work = work.resolve()
        self.cross = cross or cross_dir()
        self.rootfs: Path | None = None

    def prepare(self) -> Path:
        """The cached rootfs, brought up to date with this checkout (fast when warm)."""
        if os.geteuid() != 0:
            raise CrossError("--arm-devices needs root (binfmt_misc, chroot, mount namespaces)")
        try:
            out = subprocess.run([str(self.cross / "build_rootfs.sh")], capture_output=True,
                                 text=True, timeout=BUILD_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CrossError(f"cross/build_rootfs.sh took over {BUILD_TIMEOUT_S} s") from None
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise CrossError(f"cross/build_rootfs.sh failed: {tail}")
        self.rootfs = Path(out.stdout.strip().splitlines()[-1])
        return self.rootfs

    def argv(self, name: str, command: list[str]) -> list[str]:
        """``command`` inside device ``name``: its own overlay disk and host name, the
        work folder at the same path."""
        if self.rootfs is None:
            raise CrossError("prepare() the rootfs first")
        disk = self.work / "cross" / name
        disk.mkdir(parents=True, exist_ok=True)
        return [str(self.cross / "run.sh"), "--rootfs", str(self.rootfs), "--state", str(disk),
                "--hostname", name, "--bind", f"{self.work}:{self.work}",
                "--ro-bind", f"{self.cross / 'patient_supernode.py'}:{PATIENT_SUPERNODE}",
                "--", *command]

    def agent_argv(self, name: str, config: Path) -> list[str]:
        """The device's own ``edgefleet-agent run`` (aarch64 Python from the device venv)."""
        return self.argv(name, [str(DEVICE_VENV_BIN / "edgefleet-agent"), "run", "--config",
                                str(config)])

    def machine(self, name: str) -> str:
        """``uname -m`` inside device ``name`` (``aarch64`` when emulation works)."""
        out = subprocess.run(self.argv(name, ["uname", "-m"]), capture_output=True, text=True,
                             timeout=120, check=False)
        if out.returncode != 0:
            tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
            raise CrossError(f"cannot run a program in emulated device {name}: {tail}")
        return out.stdout.strip()
