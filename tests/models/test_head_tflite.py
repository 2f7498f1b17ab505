"""A fine-tuned head's version gets a rebuilt int8 TFLite variant from the kept Keras model.

The imported CNN (tests/models/conftest.py) keeps its ``.keras`` file in ``source/``; a
head trained here in NumPy on a shifted camera's embeddings (what a federated run hands
:meth:`HeadJob.package`) is written into the fp32 ONNX graph and into that Keras model,
which is converted like at import. The three variants must then answer alike, the TFLite
file must carry the new head (not the parent's), and a device must serve it. Sources that
cannot give a TFLite variant ship ONNX only and say why.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.errors import UsageError
from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.runtime.archive import extract_package, pack_package
from edgefleet.device.runtime.backends import open_backend
from edgefleet.device.runtime.golden import normalize
from edgefleet.device.runtime.manifest import Manifest, Variant, load_package
from edgefleet.device.runtime.mlp import MLP
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.importer import import_model
from edgefleet.models.core.train import TrainConfig, train_sgd
from edgefleet.models.sim.shift import Shift, shifted_pixels
from edgefleet.server.fl.head import HeadJob
from tests.support.byom import import_opts

SHIFT = Shift(intensity=0.6, noise=2.0)
VARIANTS = ("onnx-fp32", "onnx-int8", "tflite-int8")


def _rows(m: Manifest, x: np.ndarray) -> np.ndarray:
    return normalize(x.reshape(len(x), -1), m.normalization)


def _embed(job: HeadJob, x: np.ndarray) -> np.ndarray:
    """The int8 backbone's embeddings of raw images (what a device trains the head on)."""
    m, cut = job.manifest, job.cut
    assert cut.backbone is not None
    ref = m.variant("onnx-int8")
    backbone = open_backend(job.root, Variant(
        file=cut.backbone, format="onnx", precision="int8", input_name=ref.input_name,
        output_name=cut.embedding, input_shape=ref.input_shape), threads=1)
    return np.asarray(backbone.run(_rows(m, x)), np.float32)


def _fine_tune(job: HeadJob, x: np.ndarray, y: np.ndarray) -> MLP:
    head = MLP.from_params([p.copy() for p in job.initial.params])
    return train_sgd(head, _embed(job, x), y, TrainConfig(epochs=15, lr=0.02))


def _logits(pkg: Path, key: str, x: np.ndarray) -> np.ndarray:
    m = load_package(pkg)
    return np.asarray(open_backend(pkg, m.variant(key), threads=1).run(_rows(m, x)))


@pytest.fixture(scope="module")
def ft(data: dict[str, Any], keras_pkg: Path, tmp_path_factory: pytest.TempPathFactory
       ) -> dict[str, Any]:
    """The CNN's head fine-tuned on shifted training images, packaged as 1.0.1."""
    rng = np.random.default_rng(3)
    x_train = shifted_pixels(data["x_train"], SHIFT, rng)
    x_test = shifted_pixels(data["x_eval"], SHIFT, rng)
    job = HeadJob.open(str(keras_pkg))
    head = _fine_tune(job, x_train, data["y_train"])
    out = tmp_path_factory.mktemp("head-tflite") / "cnn-ft"
    job.package(head, out, {"source": "test"})
    return {"pkg": out, "parent": keras_pkg, "head": head, "x_train": x_train,
            "x_test": x_test, "y_test": data["y_eval"]}


def test_a_fine_tuned_keras_head_ships_a_rebuilt_tflite_variant(ft: dict[str, Any]) -> None:
    m, parent = load_package(ft["pkg"]), load_package(ft["parent"])
    assert set(m.variants) == set(VARIANTS) and m.version == "1.0.1"
    tfl = m.lineage["fine_tuned"]["tflite"]
    assert tfl["rebuilt"] is True and tfl["from"] == "source/model.keras", tfl
    # the two variables of the Keras model's last Dense layer took the new head
    assert len(tfl["variables"]) == 2 and tfl["max_abs_diff_vs_onnx_fp32"] < 1e-3
    assert m.lineage["fine_tuned"]["parent"]["version"] == "1.0.0"
    assert "tflite-int8" in m.lineage["fine_tuned"]["parent"]["variants"]
    assert m.lineage["quantization"]["tflite"]["converter"] == "TFLiteConverter.from_saved_model"
    # a new file, not the parent's
    assert m.files["model_int8.tflite"].sha256 != parent.files["model_int8.tflite"].sha256
    # the TensorFlow model with the new head is kept for the next fine-tuning, never shipped
    assert (ft["pkg"] / "source" / "saved_model" / "saved_model.pb").is_file()
    assert not any(f.startswith("source") for f in m.files)
    assert "tflite-int8" in {k for g in m.golden for k in g.logits}


def test_the_three_variants_of_the_fine_tuned_version_agree(
        ft: dict[str, Any], data: dict[str, Any]) -> None:
    for x in (ft["x_test"], data["x_eval"]):
        fp32 = _logits(ft["pkg"], "onnx-fp32", x)
        scale = float(np.abs(fp32).max())
        for key in ("onnx-int8", "tflite-int8"):
            got = _logits(ft["pkg"], key, x)
            agree = float(np.mean(got.argmax(1) == fp32.argmax(1)))
            err = np.abs(got - fp32)
            print(f"{key}: argmax agreement {agree:.3f}, mean |Δ| {err.mean():.3f}, "
                  f"p95 |Δ| {np.quantile(err, 0.95):.3f}, max |logit| {scale:.2f}")
            assert agree >= 0.95, (key, agree)
            # int8 tolerance: the golden check's 5 % of the largest logit, on nearly all
            assert float(np.quantile(err, 0.95)) <= 0.05 * scale, key
    # the fp32 graph is the NumPy head on the fp32 backbone's output: the TFLite answers
    # follow the new head, so on the shifted camera it beats the parent's TFLite
    acc = {name: float(np.mean(_logits(pkg, "tflite-int8", ft["x_test"]).argmax(1)
                               == ft["y_test"]))
           for name, pkg in (("parent", ft["parent"]), ("fine-tuned", ft["pkg"]))}
    print(f"shifted-camera accuracy of tflite-int8: {acc}")
    assert acc["fine-tuned"] > acc["parent"], acc
    changed = np.mean(_logits(ft["pkg"], "tflite-int8", ft["x_test"]).argmax(1)
                      != _logits(ft["parent"], "tflite-int8", ft["x_test"]).argmax(1))
    assert changed > 0.02, changed


def test_a_device_serves_the_fine_tuned_tflite_variant(ft: dict[str, Any],
                                                       tmp_path: Path) -> None:
    dev = tmp_path / "device"
    extract_package(pack_package(ft["pkg"], tmp_path / "ft.tar"), dev)
    assert not (dev / "source").exists()
    # loading runs the golden inputs through the variant: a stale TFLite file would fail
    tfl = Predictor.load(dev, backend="tflite", threads=1)
    onx = Predictor.load(dev, backend="onnx", threads=1)
    assert tfl.variant == "tflite-int8" and onx.variant == "onnx-int8"
    a = [p.label for p in tfl.predict_batch(ft["x_test"])]
    b = [p.label for p in onx.predict_batch(ft["x_test"])]
    assert np.mean(np.asarray(a) == np.asarray(b)) >= 0.95


def test_fine_tuning_the_fine_tuned_version_rebuilds_its_tflite_again(
        ft: dict[str, Any], data: dict[str, Any], tmp_path: Path) -> None:
    job = HeadJob.open(str(ft["pkg"]))
    np.testing.assert_allclose(job.initial.params[0], ft["head"].params[0], atol=1e-6)
    head = _fine_tune(job, ft["x_train"][::-1], data["y_train"][::-1])
    out = tmp_path / "cnn-ft2"
    job.package(head, out, {"source": "test"})
    m = load_package(out)
    assert m.version == "1.0.2" and set(m.variants) == set(VARIANTS)
    assert m.lineage["fine_tuned"]["tflite"]["from"] == "source/saved_model"
    assert (m.files["model_int8.tflite"].sha256
            != load_package(ft["pkg"]).files["model_int8.tflite"].sha256)


def test_a_head_missing_from_the_kept_keras_model_ships_onnx_only(
        ft: dict[str, Any], tmp_path: Path) -> None:
    from edgefleet.models.build.tflite_export import _import_tf

    _import_tf()
    import keras

    # the kept Keras model is not the one the graph came from: its last layer differs
    pkg = tmp_path / "cnn"
    shutil.copytree(ft["parent"], pkg)
    km = keras.models.load_model(pkg / "source" / "model.keras")
    w, b = km.layers[-1].get_weights()
    km.layers[-1].set_weights([w + 0.5, b])
    km.save(pkg / "source" / "model.keras")
    before = default_metrics().counter("head_rejected_tf_source")
    HeadJob.open(str(pkg)).package(ft["head"], tmp_path / "a", {"source": "test"})
    m = load_package(tmp_path / "a")
    assert set(m.variants) == {"onnx-fp32", "onnx-int8"}
    tfl = m.lineage["fine_tuned"]["tflite"]
    assert tfl["rebuilt"] is False and "not in the TensorFlow source" in tfl["reason"], tfl
    assert default_metrics().counter("head_rejected_tf_source") == before + 1
    # its own next version says where the missing variant comes from
    HeadJob.open(str(tmp_path / "a")).package(ft["head"], tmp_path / "a2", {"source": "t"})
    reason = load_package(tmp_path / "a2").lineage["fine_tuned"]["tflite"]["reason"]
    assert reason.startswith("the parent 1.0.1 has no TFLite variant either (the head is "
                             "not in the TensorFlow source"), reason
    # an unreadable kept model
    (pkg / "source" / "model.keras").write_bytes(b"not a zip")
    HeadJob.open(str(pkg)).package(ft["head"], tmp_path / "c", {"source": "test"})
    m = load_package(tmp_path / "c")
    assert set(m.variants) == {"onnx-fp32", "onnx-int8"}
    assert "cannot be loaded" in m.lineage["fine_tuned"]["tflite"]["reason"]
    assert default_metrics().counter("head_rejected_tf_source") == before + 2
    # no kept model at all (a package imported before the model was kept)
    (pkg / "source" / "model.keras").unlink()
    HeadJob.open(str(pkg)).package(ft["head"], tmp_path / "b", {"source": "test"})
    m = load_package(tmp_path / "b")
    assert set(m.variants) == {"onnx-fp32", "onnx-int8"}
    assert "keeps no TensorFlow model" in m.lineage["fine_tuned"]["tflite"]["reason"]


def test_an_onnx_source_ships_onnx_only_and_the_cli_says_so(
        mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    from edgefleet.server.cli.train_cmd import _fine_tuned, fine_tuned_lines

    pkg = tmp_path / "mlp"
    import_model(import_opts(data, mlp_onnx, pkg, calibration=data["calib_flat"],
                             eval=data["eval_flat"], methods=("minmax",)))
    job = HeadJob.open(str(pkg))
    job.package(MLP.from_params([p * 1.1 for p in job.initial.params]), tmp_path / "ft",
                {"source": "test"})
    result = _fine_tuned(tmp_path / "ft")
    assert result["variants"] == ["onnx-fp32", "onnx-int8"]
    assert result["tflite"] == {"rebuilt": False, "reason": "the source is an ONNX model "
                                "(no TensorFlow model to convert)"}
    lines = fine_tuned_lines(result)
    assert lines[0] == "variants: onnx-fp32, onnx-int8"
    assert "TFLite not rebuilt" in lines[1] and "ONNX variants only" in lines[1]
    assert "ONNX model" in lines[1]
    assert fine_tuned_lines({"package": "x"}) == []


def test_an_int8_tflite_source_cannot_be_fine_tuned(
        ft: dict[str, Any], data: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app

    src = tmp_path / "cnn_int8.tflite"
    src.write_bytes((ft["parent"] / "model_int8.tflite").read_bytes())
    pkg = tmp_path / "pkg"
    import_model(import_opts(data, src, pkg))
    with pytest.raises(UsageError, match="int8 TFLite file, which has no fp32 graph"):
        HeadJob.open(str(pkg))
    # the CLI refuses before any process starts
    res = CliRunner().invoke(app, ["train", "--head-of", str(pkg), "--embedded",
                                   "--work-dir", str(tmp_path / "work"),
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "int8 TFLite file" in str(res.exception) + res.output
    assert not (tmp_path / "out").exists()
