"""Bring-your-own-model fixtures: scikit-learn's digits as 8x8x1 images, a trained MLP
exported to ONNX, a tiny Keras CNN and its imported package (tests/models/conftest.py
makes them session fixtures, so the CNN is trained once per test worker)."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.models.build.importer import ImportOptions
from edgefleet.models.sim.head_fleet import digits_images, make_data, save_npz

__all__ = ["FLOAT_COMPUTE", "digits_images", "import_opts", "int8_graph_ops", "make_data",
           "make_keras_model", "make_mlp_onnx", "save_npz"]


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
    """The worked example's tiny Keras CNN trained on ``x_train``, saved as .keras."""
    from edgefleet.models.build.example_cnn import train_digits_cnn

    return train_digits_cnn(data["x_train"], data["y_train"], data["root"] / "cnn.keras",
                            seed)


def import_opts(data: dict[str, Any], model: Path, out: Path, **kw: Any) -> ImportOptions:
    base: dict[str, Any] = {"calibration": data["calib"], "eval": data["eval"],
                            "labels": data["labels"], "scale": 1 / 16}
    base.update(kw)
    return ImportOptions(model=model, out=out, **base)


#: Operators that compute in float; none may stay in an int8 ONNX variant.
FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "Add", "Mul"}


def int8_graph_ops(path: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Operator counts of an ONNX file and of onnxruntime's optimized graph of it."""
    import onnx
    import onnxruntime as ort

    def ops(f: Path) -> collections.Counter[str]:
        return collections.Counter(n.op_type for n in onnx.load(str(f)).graph.node)

    with tempfile.TemporaryDirectory() as td:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(td) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return ops(path), ops(Path(td) / "optimized.onnx")
