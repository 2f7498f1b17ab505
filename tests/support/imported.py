"""Small operator models for ``models import`` and the device's input-by-spec tests.

Two hand-made ONNX graphs whose answers a test can predict, imported by the real
importer (no TensorFlow needed):

* :func:`image_model`: digits as 8x8x1 NHWC images (pixels 0..16), a softmax regression
  fitted here in NumPy (Flatten → MatMul → Add); imported with ``scale = 1/16``.
* :func:`window_model`: windows of ``N`` samples x ``C`` channels (NWC); the logits are
  the channel means, so the class is the channel with the largest mean: a test that
  streams samples knows which class each window must get, and a window assembled in the
  wrong order or with channels mixed up gets the wrong one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.models.build.importer import ImportOptions, import_model
from tests.support.byom import digits_images, save_npz


def _save_graph(path: Path, in_dims: list[Any], n_in: int, w: np.ndarray,
                b: np.ndarray) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten", axis=1),
             helper.make_node("MatMul", ["flat", "W"], ["mm"], name="dense"),
             helper.make_node("Add", ["mm", "B"], ["logits"], name="bias")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *in_dims])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32).reshape(n_in, -1), "W"),
         numpy_helper.from_array(b.astype(np.float32), "B")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save_model(proto, str(path))
    return path


def _softmax_regression(x: np.ndarray, y: np.ndarray, classes: int,
                        steps: int = 300, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    w = np.zeros((x.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * x.T @ g
        b -= lr * g.sum(0)
    return w, b


def image_model(root: Path) -> Path:
    """Import the digits image model into ``root/pkg``; returns the package folder.

    Also writes ``root/eval.npz`` (the held-out images the tests use).
    """
    x, y = digits_images()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    tr, ca, ev = slice(0, 1000), slice(1000, 1400), slice(1400, None)
    w, b = _softmax_regression(x[tr].reshape(-1, 64) / 16.0, y[tr], 10)
    model = _save_graph(root / "cnn.onnx", [8, 8, 1], 64, w, b)
    out = root / "pkg"
    import_model(ImportOptions(model=model, out=out, calibration=save_npz(
        root / "calib.npz", x[ca], y[ca]), eval=save_npz(root / "eval.npz", x[ev], y[ev]),
        scale=1 / 16, methods=("minmax",)))
    return out


def windows_data(n: int, window: int, channels: int,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Windows whose class is the channel with the largest mean (raw values ~ 10)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, channels, n)
    x = rng.normal(10.0, 1.0, size=(n, window, channels)).astype(np.float32)
    x[np.arange(n), :, y] += 5.0
    return x, y.astype(np.int64)


def window_model(root: Path, window: int = 16, channels: int = 3) -> Path:
    """Import the channel-mean window model (``NWC``, mean 10 / std 2 preprocessing)."""
    w = np.zeros((window, channels, channels))
    for c in range(channels):
        w[:, c, c] = 1.0 / window
    model = _save_graph(root / "win.onnx", [window, channels], window * channels,
                        w.reshape(window * channels, channels), np.zeros(channels))
    xc, yc = windows_data(300, window, channels, seed=1)
    xe, ye = windows_data(300, window, channels, seed=2)
    out = root / "wpkg"
    import_model(ImportOptions(model=model, out=out, calibration=save_npz(root / "wc.npz", xc, yc),
                               eval=save_npz(root / "we.npz", xe, ye), mean=(10.0,), std=(2.0,),
                               labels=None, methods=("minmax",)))
    return out
