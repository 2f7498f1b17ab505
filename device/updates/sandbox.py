"""Trial-load a new model in a throwaway subprocess with resource limits.

onnxruntime has segfaulted on fuzzed models and TensorFlow calls an untrusted model
untrusted code, so even a signed, hash-verified package is first loaded in a child
process under ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` and a wall-clock timeout.
A crash, hang, OOM or failed golden input there becomes :class:`ModelRejected`; the
daemon itself never loads bytes that did not survive this.

Run as ``python -m edgefleet.device.updates.sandbox PACKAGE VARIANT...`` (the child side).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgefleet.device.core.errors import ModelRejected

__all__ = ["TrialLimits", "TrialReport", "trial_load"]

log = logging.getLogger(__name__)

_REJECTED_EXIT = 3


@dataclass(frozen=True)
class TrialLimits:
    """Resource limits of the trial child."""

    address_space_bytes: int = 1024**3
    cpu_seconds: int = 30
    timeout_s: float = 60.0


@dataclass(frozen=True)
class TrialReport:
    """What a successful trial measured: the worst golden logit difference per variant."""

    worst_diff: dict[str, float]


def _limit(limits: TrialLimits) -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_AS, (limits.address_space_bytes,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def trial_load(root: Path, variants: list[str], limits: TrialLimits | None = None) -> TrialReport:
    """Load each variant of the package in ``root`` in a limited child and run its golden inputs.

    Raises :class:`ModelRejected` naming how the child failed.
    """
    lim = limits or TrialLimits()
    cmd = [sys.executable, "-m", "edgefleet.device.updates.sandbox", str(root), *variants]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                            preexec_fn=lambda: _limit(lim))  # noqa: PLW1509 - rlimits only
    try:
        out, err = proc.communicate(timeout=lim.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise ModelRejected(f"trial load hung (no answer within {lim.timeout_s:g} s)") from None
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        raise ModelRejected(f"trial load crashed ({name})")
    try:
        answer = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelRejected(
            f"trial load failed (exit {proc.returncode}: {tail[0][:200]})") from None
    if proc.returncode != 0 or not answer.get("ok"):
        raise ModelRejected(f"trial load rejected it: {answer.get('error', 'unknown error')}")
    return TrialReport(worst_diff={k: float(v) for k, v in answer["worst_diff"].items()})


def _child(argv: list[str]) -> int:
    import numpy as np

    from edgefleet.device.core.errors import EdgefleetError
    from edgefleet.device.runtime.backends import open_backend
    from edgefleet.device.runtime.golden import check_golden, normalize
    from edgefleet.device.runtime.manifest import load_package

    root = Path(argv[0])
    worst: dict[str, float] = {}
    try:
        manifest = load_package(root)
        for name in argv[1:] or [manifest.default_variant]:
            backend = open_backend(root, manifest.variant(name), threads=1)
            worst[name] = check_golden(manifest, name, backend)
            probe = np.zeros((1, *manifest.input.shape), dtype=np.float32)
            logits = backend.run(normalize(probe, manifest.normalization))
            if logits.shape != (1, len(manifest.labels)) or not np.all(np.isfinite(logits)):
                raise ModelRejected(f"{name}: output shape {logits.shape} or non-finite logits")
    except (EdgefleetError, MemoryError) as exc:
        print(json.dumps({"ok": False, "error": str(exc) or type(exc).__name__}), flush=True)
        return _REJECTED_EXIT
    print(json.dumps({"ok": True, "worst_diff": worst}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
