"""Cross-architecture parity: does the emulated arm64 device compute what x86-64 computes?

Two halves in one file, so the device runs exactly the code the host runs:

``probe`` (runs anywhere ``edgefleet[device]`` is installed, host or device)
    loads the package through :class:`edgefleet.device.runtime.predictor.Predictor` (which also
    checks the golden outputs), writes every int8 variant's logits on the given inputs,
    and one DP-SGD round of :func:`edgefleet.device.fl.dp_sgd.train_dp_sgd`
    from the package's
    fp32 weights with a fixed seed.

``compare`` (host only: needs root, the cached rootfs and scikit-learn for the split)
    runs the probe natively and inside the device (``cross/run.sh``) on the whole digits
    test split and prints the agreement as one JSON object. :func:`compare_data` does the
    same for any package (an imported one too) on given inputs, optionally running this
    checkout's sources in the device (``scripts/bench_mobilenetv2.py``).

    python cross/parity.py compare --package out/digits
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CROSS = Path(__file__).resolve().parent
#: The int8 variants a device serves; fp32 is reported too, for reference.
VARIANTS = ("onnx-int8", "tflite-int8", "onnx-fp32")
DP_SEED = 20240611
#: One local round as a device runs it (clip C, noise σ, Poisson rate q, steps, lr).
DP_CONFIG = {"clip": 1.0, "sigma": 1.0, "q": 0.1, "steps": 10, "lr": 0.1}
#: float32 weights after 10 steps: BLAS kernels differ per architecture in the last bits.
DP_ATOL = 1e-4


def probe(package: Path, inputs: Path, out: Path) -> None:
    """Write logits per variant, whether its golden check passes here, and the weights
    after one seeded DP-SGD round to ``out``. A variant this machine refuses is still run
    (straight through its backend) so the report can show by how much it differs."""
    from edgefleet.device.core.errors import ModelRejected
    from edgefleet.device.fl.dp_sgd import DpSgdConfig, train_dp_sgd
    from edgefleet.device.runtime.backends import open_backend
    from edgefleet.device.runtime.golden import normalize
    from edgefleet.device.runtime.manifest import load_package
    from edgefleet.device.runtime.mlp import MLP
    from edgefleet.device.runtime.predictor import Predictor

    data = np.load(inputs, allow_pickle=False)
    result: dict[str, Any] = {"machine": np.array(platform.machine())}
    manifest = load_package(package)
    x = data["x"]
    for name in (v for v in VARIANTS if v in manifest.variants):  # ONNX imports: no TFLite
        try:
            pred = Predictor.load(package, variant=name, threads=1)
        except ModelRejected as exc:
            # What this machine would refuse; the logits are still worth comparing.
            result[f"golden/{name}"] = np.array(str(exc))
            backend = open_backend(package, manifest.variant(name), threads=1)
            result[f"logits/{name}"] = backend.run(
                normalize(x.reshape(len(x), -1), manifest.normalization))
        else:
            result[f"golden/{name}"] = np.array("passes")
            result[f"logits/{name}"] = pred.logits(x)
    if not (package / "params.npz").exists():  # an imported model: no NumPy MLP to train
        np.savez(out, **result)
        return
    mean = np.asarray(manifest.normalization.mean, dtype=np.float32)
    std = np.asarray(manifest.normalization.std, dtype=np.float32)
    with np.load(package / "params.npz", allow_pickle=False) as p:
        params = [p[f"arr_{i}"] for i in range(len(p.files))]
    model = MLP.from_params(params)
    x_dp = ((data["dp_x"] - mean) / std).astype(np.float32)
    train_dp_sgd(model, x_dp, data["dp_y"], DpSgdConfig(**DP_CONFIG),  # type: ignore[arg-type]
                 np.random.default_rng(DP_SEED))
    for i, arr in enumerate(model.params):
        result[f"dp/{i}"] = arr
    np.savez(out, **result)


def _device_probe(package: Path, work: Path, rootfs: str | None, cpu: str | None,
                  source: Path | None = None) -> None:
    cmd = [str(CROSS / "run.sh")]
    if rootfs:
        cmd += ["--rootfs", rootfs]
    if cpu:
        cmd += ["--cpu", cpu]
    if source is not None:
        # This checkout's edgefleet instead of the one installed in the (shared) rootfs:
        # a copy of its packages first on the device's PYTHONPATH.
        src = work / "src" / "edgefleet"
        src.mkdir(parents=True)
        (src / "__init__.py").write_text("")
        for sub in ("device", "models"):
            shutil.copytree(source / sub, src / sub,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd += ["--env", "PYTHONPATH=/mnt/io/src"]
    cmd += ["--ro-bind", f"{CROSS}:/mnt/cross", "--ro-bind", f"{package}:/mnt/pkg",
            "--bind", f"{work}:/mnt/io", "--",
            "python", "/mnt/cross/parity.py", "probe", "--package", "/mnt/pkg",
            "--inputs", "/mnt/io/inputs.npz", "--out", "/mnt/io/arm64.npz"]
    subprocess.run(cmd, check=True, timeout=900)


def compare(package: Path, rootfs: str | None = None, cpu: str | None = None) -> dict[str, Any]:
    """Run the probe on both architectures; argmax agreement and DP weight differences.

    ``cpu`` is the emulated CPU model (``cross/run.sh --cpu``; default a Raspberry Pi 4's).
    """
    from edgefleet.device.runtime.mlp import load_params
    from edgefleet.models.core.tasks import get_task

    split = get_task("digits").split()
    package = package.resolve()
    with tempfile.TemporaryDirectory(prefix="edgefleet-parity-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", x=split.x_test, dp_x=split.x_train[:400],
                 dp_y=split.y_train[:400])
        subprocess.run([sys.executable, __file__, "probe", "--package", str(package),
                        "--inputs", str(work / "inputs.npz"), "--out", str(work / "x86.npz")],
                       check=True, timeout=600)
        _device_probe(package, work, rootfs, cpu)
        host = dict(np.load(work / "x86.npz", allow_pickle=False))
        dev = dict(np.load(work / "arm64.npz", allow_pickle=False))
    report: dict[str, Any] = {
        "host_machine": str(host["machine"]), "device_machine": str(dev["machine"]),
        "device_cpu": cpu or "cortex-a72",
        "n_test": len(split.y_test), "variants": {},
    }
    for name in VARIANTS:
        report["variants"][name] = _agreement(host, dev, name, split.y_test)
    start = load_params(package / "params.npz")
    n = len(start)
    diff = max(float(np.max(np.abs(host[f"dp/{i}"] - dev[f"dp/{i}"]))) for i in range(n))
    upd = np.concatenate([(host[f"dp/{i}"] - start[i]).ravel() for i in range(n)])
    upd_dev = np.concatenate([(dev[f"dp/{i}"] - start[i]).ravel() for i in range(n)])
    report["dp"] = {
        **DP_CONFIG, "seed": DP_SEED, "max_abs_weight_diff": diff, "atol": DP_ATOL,
        "update_norm": float(np.linalg.norm(upd)),
        "relative_update_diff": float(np.linalg.norm(upd - upd_dev) / np.linalg.norm(upd)),
        "within_tolerance": diff <= DP_ATOL,
    }
    return report


def compare_data(package: Path, x: np.ndarray, y: np.ndarray, *, rootfs: str | None = None,
                 cpu: str | None = None, source: Path | None = None) -> dict[str, Any]:
    """Logit parity of every variant on raw inputs ``x`` (labels ``y``), x86-64 vs arm64.

    For any package (an imported one too: no DP round, it has no NumPy MLP). ``source``
    runs that checkout's edgefleet in the device instead of the rootfs's installed one.
    """
    package = package.resolve()
    with tempfile.TemporaryDirectory(prefix="edgefleet-parity-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", x=x)
        subprocess.run([sys.executable, __file__, "probe", "--package", str(package),
                        "--inputs", str(work / "inputs.npz"), "--out", str(work / "x86.npz")],
                       check=True, timeout=900)
        _device_probe(package, work, rootfs, cpu, source)
        host = dict(np.load(work / "x86.npz", allow_pickle=False))
        dev = dict(np.load(work / "arm64.npz", allow_pickle=False))
    return {"host_machine": str(host["machine"]), "device_machine": str(dev["machine"]),
            "device_cpu": cpu or "cortex-a72", "n": len(y),
            "variants": {name: _agreement(host, dev, name, y)
                         for name in VARIANTS if f"logits/{name}" in host}}


def _agreement(host: dict[str, Any], dev: dict[str, Any], name: str,
               y: np.ndarray) -> dict[str, Any]:
    a, b = host[f"logits/{name}"], dev[f"logits/{name}"]
    return {"argmax_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "max_abs_logit_diff": float(np.max(np.abs(a - b))),
            "accuracy_x86": float(np.mean(a.argmax(1) == y)),
            "accuracy_arm64": float(np.mean(b.argmax(1) == y)),
            "golden_x86": str(host[f"golden/{name}"]),
            "golden_arm64": str(dev[f"golden/{name}"])}


def main(argv: list[str] | None = None) -> int:
    """``probe`` or ``compare`` (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="write logits and a DP round for these inputs")
    p.add_argument("--package", type=Path, required=True)
    p.add_argument("--inputs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("compare", help="x86-64 against the emulated arm64 device")
    c.add_argument("--package", type=Path, required=True)
    c.add_argument("--rootfs", help="rootfs to use (default: the cached one)")
    c.add_argument("--cpu", help="emulated CPU model (default: cortex-a72, a Pi 4)")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        probe(args.package, args.inputs, args.out)
    else:
        print(json.dumps(compare(args.package, args.rootfs, args.cpu), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
