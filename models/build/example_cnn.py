"""The worked example's user model: a tiny Keras CNN on scikit-learn's digits.

What an operator would bring (docs/bring-your-own-model.md): a model they trained
themselves, saved as ``.keras``. The demo (``edgefleet demo --model cnn``), the import
tests and ``scripts/bench_byom_fl.py`` train it here so all three import the same model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from edgefleet.models.build.tflite_export import _import_tf

__all__ = ["train_digits_cnn"]


def train_digits_cnn(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], path: Path,
                     seed: int = 0) -> Path:
    """Conv 8x3x3, max-pool, dense 32, dense 10 on ``(n, 8, 8, 1)`` images (0..16), trained
    8 epochs (``seed`` fixes initialization and batch order), saved as ``.keras``."""
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
    model.fit(x / 16.0, y, epochs=8, batch_size=32, verbose=0)
    model.save(path)
    return path
