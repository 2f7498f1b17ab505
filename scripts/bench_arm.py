"""Cross-architecture parity and emulation cost: x86-64 against an emulated arm64 device.

Builds (or reuses) the cached rootfs with cross/build_rootfs.sh, builds a digits package,
then runs cross/parity.py on both architectures over the whole digits test split and
writes docs/bench/arm.md. Needs root (binfmt_misc, chroot).

    .venv/bin/python scripts/bench_arm.py [--package out/digits]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

REPO = Path(__file__).resolve().parents[1]
CROSS = REPO / "cross"


def _parity() -> object:
    spec = importlib.util.spec_from_file_location("edgefleet_cross_parity", CROSS / "parity.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CPUS = {"cortex-a72": "Raspberry Pi 4", "cortex-a76": "Raspberry Pi 5"}


def _timed_device_start(rootfs: str) -> float:
    """Seconds for a fresh device to import edgefleet's inference stack (warm cache)."""
    t0 = time.perf_counter()
    subprocess.run([str(CROSS / "run.sh"), "--rootfs", rootfs, "--", "python", "-c",
                    "import onnxruntime, ai_edge_litert.interpreter, "
                    "edgefleet.device.runtime.predictor"], check=True, timeout=600)
    return time.perf_counter() - t0


def _golden_on_cpu(rootfs: str, pkg: Path, cpu: str) -> str:
    """Whether each int8 variant passes its golden check on QEMU CPU model ``cpu``."""
    code = ("from edgefleet.device.runtime.predictor import Predictor\n"
            "for v in ('onnx-int8', 'tflite-int8'):\n"
            "    try:\n"
            "        Predictor.load('/mnt/pkg', variant=v, threads=1); print(v, 'passes')\n"
            "    except Exception as e:\n"
            "        print(e)\n")
    out = subprocess.run([str(CROSS / "run.sh"), "--rootfs", rootfs, "--cpu", cpu,
                          "--ro-bind", f"{pkg}:/mnt/pkg", "--", "python", "-c", code],
                         capture_output=True, text=True, timeout=600, check=False)
    return "; ".join(out.stdout.split("\n")).strip("; ") or out.stderr.strip()[-200:]


def main() -> int:
    """Measure, then write the section."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--package", type=Path, help="a built digits package (default: build one)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rootfs = subprocess.run([str(CROSS / "build_rootfs.sh")], check=True, text=True,
                            stdout=subprocess.PIPE, timeout=3600).stdout.strip().splitlines()[-1]
    ensure_s = time.perf_counter() - t0
    parity = _parity()
    reports, seconds = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-arm-") as tmp:
        pkg = args.package
        if pkg is None:
            from edgefleet.models.build.pipeline import BuildOptions, build_package

            pkg = Path(tmp) / "digits"
            build_package(BuildOptions(task="digits", out=pkg, formats="all", seed=0))
        start_s = _timed_device_start(rootfs)
        for cpu in CPUS:
            t0 = time.perf_counter()
            reports[cpu] = parity.compare(pkg, rootfs, cpu)  # type: ignore[attr-defined]
            seconds[cpu] = time.perf_counter() - t0
        qemu_max = _golden_on_cpu(rootfs, pkg.resolve(), "max")
    first = next(iter(reports.values()))
    rows = [[f"{cpu} ({CPUS[cpu]})", name, f"{v['argmax_agreement'] * 100:.2f} %",
             f"{v['max_abs_logit_diff']:.2e}", f"{v['accuracy_x86'] * 100:.2f} %",
             f"{v['accuracy_arm64'] * 100:.2f} %"]
            for cpu, rep in reports.items() for name, v in rep["variants"].items()]
    dp_rows = [[f"{cpu}", f"{rep['dp']['update_norm']:.4f}",
                f"{rep['dp']['max_abs_weight_diff']:.2e}",
                f"{rep['dp']['relative_update_diff']:.2e}", rep["dp"]["within_tolerance"]]
               for cpu, rep in reports.items()]
    dp = first["dp"]
    body = (
        f"Whole digits test split ({first['n_test']} samples), one package, "
        f"{first['host_machine']} natively against {first['device_machine']} under "
        "qemu-user (cross/parity.py; the device runs the same probe through "
        "`edgefleet.device.runtime.predictor.Predictor`, golden check included).\n\n"
        + md_table(["emulated CPU", "variant", "argmax agreement", "max abs Δ logit",
                    "accuracy x86-64", "accuracy arm64"], rows)
        + "\n\nOne DP-SGD round (`edgefleet.device.privacy.accounting.train_dp_sgd`, "
        f"C={dp['clip']}, σ={dp['sigma']}, q={dp['q']}, {dp['steps']} steps, "
        f"lr={dp['lr']}, seed {dp['seed']}) from the package's fp32 weights on 400 "
        "training rows, arm64 against x86-64:\n\n"
        + md_table(["emulated CPU", "update L2 norm", "max abs Δ weight", "relative Δ update",
                    f"within atol {dp['atol']:g}"], dp_rows)
        + f"\n\nQEMU's `max` CPU model (SVE + SME): {qemu_max}.\n\n"
        + md_table(["step", "seconds"], [
            ["cross/build_rootfs.sh, warm (cache check; reinstall our wheel if code changed)",
             f"{ensure_s:.1f}"],
            ["device start: import onnxruntime + LiteRT + edgefleet under emulation",
             f"{start_s:.1f}"],
            *[[f"parity run, {cpu} (probe on both architectures)", f"{s:.1f}"]
              for cpu, s in seconds.items()]])
    )
    print(write_section("arm", "ARM64 (emulated) against x86-64", body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
