"""Simulated devices for federated head fine-tuning of an imported digits model.

The demo (``edgefleet demo --model cnn``), tests/models/test_head_fl.py and
scripts/bench_byom_fl.py run the same fleet: each device holds the package as a device
receives it (packed and unpacked: no ``source/`` data), a sample store of its share of
the training images as its shifted camera delivers them (:mod:`.shift`), and its own
held-out shifted images, which neither the CNN nor the head ever trains on, for measuring.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.data.store import SampleStore
from edgefleet.device.fl.client import app as client_app
from edgefleet.device.runtime.archive import extract_package, pack_package
from edgefleet.models.sim.shift import Shift, shifted_pixels

__all__ = ["CAMERAS", "FIELD_SHIFTS", "N_CALIB", "N_EVAL", "SHIFTS", "client_app",
           "digits_images", "make_data", "make_fleet", "node_config", "save_npz"]

N_CALIB, N_EVAL = 400, 397
#: One camera per device, cycled: dimmer or brighter, more or less sensor noise.
SHIFTS = (Shift(intensity=0.6, noise=2.0), Shift(intensity=0.4, noise=1.0),
          Shift(intensity=0.8, noise=3.0))
#: Cameras in the field: also turned, and drawing strokes thicker or thinner.
FIELD_SHIFTS = (Shift(intensity=0.6, noise=2.0, rotation=15.0),
                Shift(intensity=0.8, noise=1.0, thickness=0.6),
                Shift(intensity=0.7, noise=3.0, rotation=-12.0, thickness=-0.3))
CAMERAS = {"light": SHIFTS, "field": FIELD_SHIFTS}


def digits_images() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """scikit-learn's digits as ``(n, 8, 8, 1)`` float32 images (0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32)[..., None], d.target.astype(np.int64)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """An import ``.npz`` (``x`` inputs, ``y`` labels)."""
    np.savez(path, x=x, y=y)
    return path


def make_data(root: Path) -> dict[str, Any]:
    """Digits as 8x8x1 images (0..16): train / calibration / evaluation rows and files."""
    x, y = digits_images()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    n_train = len(y) - N_CALIB - N_EVAL
    tr, ca, ev = slice(0, n_train), slice(n_train, n_train + N_CALIB), slice(n_train + N_CALIB,
                                                                            None)
    (root / "labels.txt").write_text("\n".join(f"digit-{i}" for i in range(10)) + "\n")
    return {"x_train": x[tr], "y_train": y[tr], "x_eval": x[ev], "y_eval": y[ev],
            "calib": save_npz(root / "calib.npz", x[ca], y[ca]),
            "eval": save_npz(root / "eval.npz", x[ev], y[ev]),
            "calib_flat": save_npz(root / "calib_flat.npz", x[ca].reshape(-1, 64), y[ca]),
            "eval_flat": save_npz(root / "eval_flat.npz", x[ev].reshape(-1, 64), y[ev]),
            "labels": root / "labels.txt", "root": root}


def make_fleet(data: dict[str, Any], package: Path, root: Path, shifts: Sequence[Shift],
               seed: int = 7, records: int | None = None) -> dict[str, Any]:
    """One device per shift: its share of ``x_train`` (shifted) in its store, and its share
    of ``x_eval`` (shifted the same way) as ``x_test``/``y_test`` for measuring.

    ``records``: each device photographs that many distinct training images of its own
    choosing instead of a disjoint share (devices overlap in the digits they see, as
    cameras on one production line would, each through its own optics and noise)."""
    server_pkg = root / "server" / package.name
    shutil.copytree(package, server_pkg)
    archive = pack_package(package, root / f"{package.name}.tar")
    rng = np.random.default_rng(seed)
    n_train = len(data["y_train"])
    if records is not None and not 0 < records <= n_train:
        raise ValueError(f"records must be 1..{n_train}, not {records}")
    shares = (np.array_split(rng.permutation(n_train), len(shifts)) if records is None
              else [rng.choice(n_train, size=records, replace=False) for _ in shifts])
    tests = np.array_split(rng.permutation(len(data["y_eval"])), len(shifts))
    devices = []
    for i, (shift, idx, tidx) in enumerate(zip(shifts, shares, tests, strict=True)):
        d = root / f"dev{i}"
        pkg = d / "model"
        extract_package(archive, pkg)
        n = len(idx)
        x = shifted_pixels(data["x_train"][idx], shift, rng).reshape(n, -1)
        y = data["y_train"][idx]
        with SampleStore(d / "data" / "samples.db") as st:
            st.add_many([(x[j], int(y[j])) for j in range(n)], "import",
                        f"{package.name}@1.0.0")
        x_test = shifted_pixels(data["x_eval"][tidx], shift, rng).reshape(len(tidx), -1)
        devices.append({"root": d, "pkg": pkg, "store": d / "data" / "samples.db",
                        "shift": shift, "x": x, "y": y, "x_test": x_test,
                        "y_test": data["y_eval"][tidx]})
    return {"root": root, "server_pkg": server_pkg, "devices": devices}


def node_config(fleet: dict[str, Any], i: int, *, state: str = "fl",
                noise_seed: int | None = None, **policy: Any) -> dict[str, Any]:
    """Device ``i``'s SuperNode node config; ``policy`` sets ``privacy-*`` keys
    (``min_mode="off"`` lets a run without DP through). ``noise_seed`` (tests and
    benchmarks) makes the DP noise reproducible; by default it comes from OS entropy."""
    d = fleet["devices"][i]
    cfg: dict[str, Any] = {
        "sample-store": str(d["store"]), "model-package": str(d["pkg"]),
        "state-dir": str(d["root"] / state), "privacy-budget": 10.0, "partition-id": i,
        "privacy-evaluation": "noised"}
    if noise_seed is not None:
        cfg["insecure-reproducible-noise-seed"] = noise_seed
    cfg.update({f"privacy-{k.replace('_', '-')}": v for k, v in policy.items()})
    return cfg
