"""Bring-your-own-model fixtures: scikit-learn's digits as 8x8x1 images, a trained MLP
exported to ONNX, a tiny Keras CNN and its imported package (tests/models/conftest.py
makes them session fixtures, so the CNN is trained once per test worker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.models.build.importer import ImportOptions

N_CALIB, N_EVAL = 400, 397


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(n, 8, 8, 1)`` float32 images (0..16) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32)[..., None], d.target.astype(np.int64)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def make_data(root: Path) -> dict[str, Any]:
    """Digits as 8x8x1 images (0..16): train / calibration / evaluation rows."""
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


def make_mlp_onnx(data: dict[str, Any]) -> Path:
    """A trained digits MLP written by the project's own ONNX export (flat 64 inputs)."""
    from edgefleet.device.runtime.mlp import MLP
    from edgefleet.models.build.onnx_export import export_onnx_fp32
    from edgefleet.models.core.train import TrainConfig, train_sgd

    model = MLP.init((64, 32, 10), seed=0)
    x = data["x_train"].reshape(-1, 64) / 16.0
    train_sgd(model, x.astype(np.float32), data["y_train"], TrainConfig(epochs=15))
    return export_onnx_fp32(model, data["root"] / "mlp.onnx")


def make_keras_model(data: dict[str, Any], seed: int = 0) -> Path:
    """A tiny Keras 3 CNN (conv, pool, dense, dense) trained for a few epochs, saved .keras
    (``seed`` fixes its initialization and batch order)."""
    from edgefleet.models.build.tflite_export import _import_tf

    _import_tf()
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data["x_train"] / 16.0, data["y_train"], epochs=8, batch_size=32, verbose=0)
    path = data["root"] / "cnn.keras"
    model.save(path)
    return path


def import_opts(data: dict[str, Any], model: Path, out: Path, **kw: Any) -> ImportOptions:
    base: dict[str, Any] = {"calibration": data["calib"], "eval": data["eval"],
                            "labels": data["labels"], "scale": 1 / 16}
    base.update(kw)
    return ImportOptions(model=model, out=out, **base)
