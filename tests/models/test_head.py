"""The backbone/head split of an imported model: extraction round trip and write-back.

Uses the project's own MLP export (64-32-10, MatMul+Add+Relu) so it needs no TensorFlow;
the Keras CNN's split is covered by the federated test (tests/models/test_head_fl.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import HeadCut, Variant, load_package
from edgefleet.device.runtime.mlp import MLP, load_params
from edgefleet.models.build.head import HeadError, head_params, write_head
from edgefleet.models.build.importer import import_model
from tests.support.byom import import_opts


@pytest.fixture(scope="module")
def mlp_pkg(data: dict[str, Any], mlp_onnx: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Path:
    out = tmp_path_factory.mktemp("mlp-pkg") / "mlp"
    import_model(import_opts(data, mlp_onnx, out, calibration=data["calib_flat"],
                             eval=data["eval_flat"]))
    return out


def _rows(pkg: Path, data: dict[str, Any]) -> np.ndarray:
    m = load_package(pkg)
    return normalize(data["x_eval"].reshape(len(data["x_eval"]), -1), m.normalization)


def _run(pkg: Path, file: str, out: str, x: np.ndarray, precision: str = "fp32") -> Any:
    m = load_package(pkg, verify=False)
    v = m.variant("onnx-fp32")
    return open_backend(pkg, Variant(file=file, format="onnx", precision=precision,  # type: ignore[arg-type]
                                     input_name=v.input_name, output_name=out,
                                     input_shape=v.input_shape), threads=1).run(x)


def _embed_fp32(pkg: Path, x: np.ndarray, tmp: Path) -> Any:
    """The fp32 graph up to the cut (the full graph does not expose the tensor)."""
    import onnx.utils

    m = load_package(pkg, verify=False)
    assert m.head is not None
    onnx.utils.extract_model(str(pkg / "model_fp32.onnx"), str(tmp / "bb.onnx"),
                             [m.variant("onnx-fp32").input_name], [m.head.embedding])
    (tmp / "manifest.json").write_bytes((pkg / "manifest.json").read_bytes())
    return _run(tmp, "bb.onnx", m.head.embedding, x)


def test_import_records_a_trainable_head_and_keeps_the_data_off_the_package(
        mlp_pkg: Path) -> None:
    m = load_package(mlp_pkg)
    head = m.head
    assert head is not None and head.trainable
    assert head.backbone == "backbone_int8.onnx" and head.params == "head.npz"
    assert head.layers == 1 and head.dim == 32
    assert {"backbone_int8.onnx", "head.npz"} <= set(m.files)
    # The operator's data is kept for re-quantizing, never listed (so never packed).
    assert (mlp_pkg / "source" / "calibration.npz").is_file()
    assert not any(f.startswith("source") for f in m.files)
    params = load_params(mlp_pkg / "head.npz")
    assert [p.shape for p in params] == [(32, 10), (10,)]


def test_backbone_and_head_give_the_full_models_logits(mlp_pkg: Path, data: dict[str, Any],
                                                       tmp_path: Path) -> None:
    m = load_package(mlp_pkg)
    assert m.head is not None
    x = _rows(mlp_pkg, data)
    full = _run(mlp_pkg, "model_fp32.onnx", m.variant("onnx-fp32").output_name, x)
    # fp32 backbone (the graph up to the cut) + NumPy head == the fp32 model
    emb = _embed_fp32(mlp_pkg, x, tmp_path)
    head = MLP.from_params(load_params(mlp_pkg / "head.npz"))
    np.testing.assert_allclose(head.forward(emb), full, atol=1e-4, rtol=1e-4)
    # the shipped int8 backbone: the same predictions as the full int8 model, nearly always
    emb8 = _run(mlp_pkg, "backbone_int8.onnx", m.head.embedding, x, "int8")
    full8 = _run(mlp_pkg, "model_int8.onnx", m.variant("onnx-int8").output_name, x, "int8")
    agree = np.mean(head.forward(emb8).argmax(1) == full8.argmax(1))
    assert agree > 0.97, agree


def test_a_written_back_head_changes_the_onnx_output_as_numpy_predicts(
        mlp_pkg: Path, data: dict[str, Any], tmp_path: Path) -> None:
    m = load_package(mlp_pkg)
    assert m.head is not None
    x = _rows(mlp_pkg, data)
    emb = _embed_fp32(mlp_pkg, x, tmp_path)
    rng = np.random.default_rng(1)
    new = [p + rng.normal(0, 0.5, p.shape).astype(np.float32)
           for p in load_params(mlp_pkg / "head.npz")]
    dest = write_head(mlp_pkg / "model_fp32.onnx", m.head, new, tmp_path / "m.onnx")
    got = _run(mlp_pkg, str(dest), m.variant("onnx-fp32").output_name, x)
    np.testing.assert_allclose(got, MLP.from_params(new).forward(emb), atol=1e-4, rtol=1e-4)
    old = _run(mlp_pkg, "model_fp32.onnx", m.variant("onnx-fp32").output_name, x)
    assert np.abs(got - old).max() > 0.1
    assert [p.shape for p in head_params(dest, m.head)] == [p.shape for p in new]


def test_write_back_refuses_a_head_of_the_wrong_shape(mlp_pkg: Path, tmp_path: Path) -> None:
    m = load_package(mlp_pkg)
    assert m.head is not None
    before = default_metrics().counter("head_rejected_head_shape")
    with pytest.raises(HeadError, match="shape") as err:
        write_head(mlp_pkg / "model_fp32.onnx", m.head,
                   [np.zeros((16, 10), np.float32), np.zeros(10, np.float32)],
                   tmp_path / "x.onnx")
    assert err.value.reason == "head_shape"
    assert default_metrics().counter("head_rejected_head_shape") == before + 1


def test_a_cut_that_leaves_no_mlp_head_is_refused_by_name(mlp_pkg: Path) -> None:
    m = load_package(mlp_pkg)
    assert m.head is not None
    # a cut whose node does not start on the named embedding tensor is refused
    bad = HeadCut(node=m.head.node, op="MatMul", embedding="nope")
    with pytest.raises(HeadError, match="not a Gemm/MatMul on 'nope'"):
        head_params(mlp_pkg / "model_fp32.onnx", bad)


def test_head_from_an_earlier_node_gives_a_two_layer_head(
        mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "two"
    import_model(import_opts(data, mlp_onnx, out, calibration=data["calib_flat"],
                             eval=data["eval_flat"], head_from="MatMul0"))
    m = load_package(out)
    assert m.head is not None and m.head.trainable and m.head.layers == 2
    assert [p.shape for p in load_params(out / "head.npz")] == [(64, 32), (32,), (32, 10),
                                                                (10,)]


def test_a_head_run_needs_a_trainable_package_and_its_kept_data(
        mlp_pkg: Path, digits_package: Path, tmp_path: Path) -> None:
    import shutil

    from edgefleet.device.core.errors import UsageError
    from edgefleet.server.fl.head import HeadJob

    with pytest.raises(UsageError, match="no trainable head"):
        HeadJob.open(str(digits_package))
    job = HeadJob.open(str(mlp_pkg))
    assert job.initial.sizes == (32, 10) and job.x_eval.shape[1] == 32
    copy = tmp_path / "pkg"
    shutil.copytree(mlp_pkg, copy)
    (copy / "source" / "eval.npz").write_bytes((copy / "source" / "calibration.npz")
                                               .read_bytes())
    with pytest.raises(UsageError, match=r"eval\.npz is missing or is not the data"):
        HeadJob.open(str(copy))
