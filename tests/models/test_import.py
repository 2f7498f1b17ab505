"""``models import``: an operator's ONNX / Keras / int8 TFLite model becomes a package.

The Keras tests train a tiny CNN on scikit-learn's digits (8x8x1) once per module; the
ONNX tests (and every bad-input test) use the project's own MLP export and hand-made
graphs, so they need no TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.device.core.metrics import default_metrics
from edgefleet.device.runtime.manifest import file_sha256, load_package
from edgefleet.device.runtime.predictor import Predictor
from edgefleet.models.build.importer import ImportOptions, ImportRejected, import_model
from edgefleet.models.build.onnx_export import (
    CALIB_OPTIONS,
    IMPORT_INT8,
    quantize_onnx_int8,
    shorten_names,
)
from tests.support.byom import FLOAT_COMPUTE, import_opts, int8_graph_ops, save_npz

# -- Keras source ------------------------------------------------------------------------


@pytest.mark.slow
def test_keras_import_packages_fp32_int8_onnx_and_tflite(keras_pkg: Path, keras_model: Path,
                                                         data: dict[str, Any]) -> None:
    m = load_package(keras_pkg)
    assert set(m.variants) == {"onnx-fp32", "onnx-int8", "tflite-int8"}
    assert m.default_variant == "onnx-int8"
    assert m.labels[3] == "digit-3" and len(m.labels) == 10
    # the input spec: one raw sample, its layout and the declared preprocessing
    assert m.input.shape == [8, 8, 1] and m.input.layout == "NHWC"
    assert m.input.preprocessing is not None and m.input.preprocessing.scale == 1 / 16
    assert m.normalization.mean == [0.0] and m.normalization.std == [16.0]
    # the trailing softmax was removed: every variant outputs logits
    assert m.lineage["model"]["removed_softmax"] is True
    fp32, int8 = m.metrics["onnx-fp32"]["accuracy"], m.metrics["onnx-int8"]["accuracy"]
    tfl = m.metrics["tflite-int8"]["accuracy"]
    assert fp32 > 0.85
    assert int8 >= fp32 - 0.02 and tfl >= fp32 - 0.02
    assert m.metrics["ece_calibrated"] < 0.1
    for key in m.variants:  # every variant outputs logits that the temperature calibrates
        assert m.metrics[key]["ece"] < 0.1, key
    # (a model this small is mostly graph: its QDQ file is not smaller than fp32)
    assert all(m.metrics[k]["size_bytes"] == m.files[v.file].size for k, v in m.variants.items())
    # the head: the last dense layer, fed by the 32-wide embedding
    assert m.head is not None and m.head.op in ("MatMul", "Gemm") and m.head.dim == 32
    # lineage: what went in, with which tools and settings
    lin = m.lineage
    assert lin["model"]["sha256"] == file_sha256(keras_model)
    assert lin["calibration"]["sha256"] == file_sha256(data["calib"])
    assert lin["eval"]["sha256"] == file_sha256(data["eval"])
    for dist in ("edgefleet", "onnxruntime", "tensorflow", "tf2onnx", "ai-edge-litert"):
        assert lin["versions"][dist], dist
    q = lin["quantization"]["onnx"]
    assert q["method"] in ("minmax", "entropy", "percentile") and q["per_channel"] is True
    assert set(q["method_scores_heldout"]) == {"minmax", "entropy", "percentile"}
    assert q["method_scores_heldout"][q["method"]] == max(q["method_scores_heldout"].values())
    assert q["calibrator_options"]["entropy"] == CALIB_OPTIONS["entropy"]
    assert q["calibrator_options"]["entropy"]["num_bins"] > 128  # onnxruntime's: 1 threshold
    assert lin["quantization"]["tflite"]["full_integer"] is True
    # every convolution and dense layer runs as an integer kernel (no float chains)
    in_file, optimized = int8_graph_ops(keras_pkg / "model_int8.onnx")
    assert not FLOAT_COMPUTE & set(in_file) and not FLOAT_COMPUTE & set(optimized)
    assert in_file["QLinearConv"] >= 1
    # no machine paths in the manifest
    assert str(data["root"]) not in (keras_pkg / "manifest.json").read_text()
    # tf2onnx's scope names are replaced by short ones; the input and output keep theirs,
    # and the head cut names the short node and embedding (the backbone was cut there)
    assert lin["model"]["short_names"] is True
    for f in ("model_fp32.onnx", "model_int8.onnx", "backbone_int8.onnx"):
        assert not [n for n in _names(keras_pkg / f) if "/" in n or len(n) > 24], f
    fp32_graph = _graph_io(keras_pkg / "model_fp32.onnx")
    for key in ("onnx-fp32", "onnx-int8"):
        v = m.variants[key]  # type: ignore[index]
        assert _graph_io(keras_pkg / v.file) == (v.input_name, v.output_name) == fp32_graph
    assert re.fullmatch(r"n\d+", m.head.node) and re.fullmatch(r"t\d+", m.head.embedding)
    assert m.head.trainable and m.head.backbone == "backbone_int8.onnx"
    assert lin["model"]["source_names"]["head_node"].startswith("StatefulPartitionedCall/")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_imported_package_loads_and_predicts_on_the_device(keras_pkg: Path, backend: str,
                                                           data: dict[str, Any]) -> None:
    p = Predictor.load(keras_pkg, backend=backend, threads=1)
    x, y = data["x_eval"], data["y_eval"]
    one = p.predict(x[0])
    assert one.label_name == f"digit-{one.label}" and 0 < one.confidence <= 1
    preds = p.predict_batch(x)
    acc = np.mean([q.label for q in preds] == y)
    assert acc == pytest.approx(load_package(keras_pkg).metrics[f"{backend}-int8"]["accuracy"],
                                abs=1e-9)
    with pytest.raises(Exception, match="shape"):
        p.predict(np.zeros((64,), np.float32))


@pytest.mark.slow
def test_imported_int8_records_its_golden_rule_and_refuses_perturbed_weights(
        keras_pkg: Path, tmp_path: Path) -> None:
    """Each int8 variant gets an ``int8-gap`` rule (docs/model-package.md); weights moved by
    10 % noise and re-hashed as a signer would are still refused by the golden check."""
    from tests.support.updates import assert_perturbed_int8_refused

    m = load_package(keras_pkg)
    for name in ("onnx-int8", "tflite-int8"):
        rule = m.golden_rule(name)
        assert rule is not None and rule.reference == "onnx-fp32", name
        assert rule.atol >= m.golden_atol[name] and rule.fp32_gap_max is not None
        assert rule.atol == max(m.golden_atol[name], rule.fp32_gap_max)
    assert m.golden_rule("onnx-fp32") is None
    assert_perturbed_int8_refused(keras_pkg, tmp_path / "pkg")


@pytest.mark.slow
def test_eval_and_inspect_report_an_imported_package(keras_pkg: Path,
                                                     data: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["models", "eval", str(keras_pkg), "--data", str(data["eval"]),
                              "--runs", "10", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    m = load_package(keras_pkg)
    for key in ("onnx-fp32", "onnx-int8", "tflite-int8"):
        assert out[key]["accuracy"] == pytest.approx(m.metrics[key]["accuracy"])
        assert out[key]["size_bytes"] > 0 and out[key]["latency_ms_p50"] > 0
        assert 0 <= out[key]["ece"] < 1
    res = runner.invoke(app, ["models", "eval", str(keras_pkg)])
    assert res.exit_code != 0 and "--data" in str(res.exception)
    res = runner.invoke(app, ["models", "inspect", str(keras_pkg)])
    assert res.exit_code == 0, res.output
    for text in ("layout NHWC", "head cut", file_sha256(data["calib"]), "tensorflow",
                 "method_scores_heldout", "converted as node", "calibrator_options"):
        assert text in res.output, text


@pytest.mark.slow
def test_import_is_reproducible(data: dict[str, Any], keras_model: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for out in ("a", "b"):
        import_model(import_opts(data, keras_model, tmp_path / out))
    names = sorted(p.relative_to(tmp_path / "a").as_posix()
                   for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "b").as_posix()
                           for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert {"model_int8.tflite", "manifest.json", "backbone_int8.onnx", "head.npz",
            "source/calibration.npz", "source/model.keras"} <= set(names)
    differ = [n for n in names
              if (tmp_path / "a" / n).read_bytes() != (tmp_path / "b" / n).read_bytes()]
    assert differ == []
    assert load_package(tmp_path / "a").created == "2023-11-14T22:13:20+00:00"


@pytest.mark.slow
def test_int8_tflite_source_is_packaged_as_is(keras_pkg: Path, data: dict[str, Any],
                                              tmp_path: Path) -> None:
    src = tmp_path / "cnn_int8.tflite"
    src.write_bytes((keras_pkg / "model_int8.tflite").read_bytes())
    res = import_model(import_opts(data, src, tmp_path / "pkg"))
    m = res.manifest
    assert set(m.variants) == {"tflite-int8"} and m.default_variant == "tflite-int8"
    assert m.files["model_int8.tflite"].sha256 == file_sha256(src)
    assert m.metrics["tflite-int8"]["accuracy"] == pytest.approx(
        load_package(keras_pkg).metrics["tflite-int8"]["accuracy"])
    p = Predictor.load(res.path, threads=1)
    answers = p.predict_batch(data["x_eval"])
    assert np.mean([q.label for q in answers] == data["y_eval"]) > 0.8
    # The drift reference's confidences are this int8 variant's, calibrated, on eval.
    from edgefleet.device.inference.drift import DriftMonitor

    mon = DriftMonitor.from_manifest(m, window=len(answers))
    assert mon is not None and m.reference_stats is not None
    mon.observe(data["x_eval"], [q.confidence for q in answers])
    assert mon.scores()["confidence_psi"] < 0.02 and mon.scores()["input_psi"] < 0.02


# -- ONNX source (no TensorFlow) ------------------------------------------------------------


def test_onnx_import_without_tensorflow(mlp_onnx: Path, data: dict[str, Any],
                                        tmp_path: Path) -> None:
    res = import_model(import_opts(data, mlp_onnx, tmp_path / "mlp", calibration=data["calib_flat"],
                             eval=data["eval_flat"], methods=("minmax", "percentile")))
    m = res.manifest
    assert set(m.variants) == {"onnx-fp32", "onnx-int8"}
    assert m.input.shape == [64] and m.input.layout == "flat"
    assert m.files["model_fp32.onnx"].sha256 == file_sha256(mlp_onnx)
    assert m.lineage["model"]["kind"] == "onnx" and m.lineage["model"]["removed_softmax"] is False
    assert m.lineage["model"]["short_names"] is False  # an operator's ONNX keeps its names
    # ... but the int8 files are the import's own: short names, input and output kept
    assert all(re.fullmatch(r"[nt]\d+|input|logits", n) for n in _names(res.path /
                                                                        "model_int8.onnx"))
    assert _graph_io(res.path / "model_int8.onnx") == ("input", "logits")
    assert m.lineage["quantization"]["onnx"]["calibrator_options"]["percentile"] == {
        "num_bins": 2048, "percentile": 99.999, "symmetric": True}
    assert m.metrics["onnx-fp32"]["accuracy"] > 0.9
    assert m.metrics["onnx-int8"]["accuracy"] >= m.metrics["onnx-fp32"]["accuracy"] - 0.02
    assert m.head is not None and m.head.node == "MatMul1" and m.head.dim == 32
    p = Predictor.load(res.path, threads=1)
    assert p.predict(data["x_eval"][0].reshape(64)).label in range(10)


def _names(path: Path) -> list[str]:
    """Every node, tensor and initializer name of an ONNX file."""
    import onnx

    g = onnx.load(str(path)).graph
    return [n.name for n in g.node] + [t for n in g.node for t in (*n.input, *n.output)] + [
        t.name for t in g.initializer]


def _graph_io(path: Path) -> tuple[str, str]:
    import onnx

    g = onnx.load(str(path)).graph
    inits = {t.name for t in g.initializer}
    return next(i.name for i in g.input if i.name not in inits), g.output[0].name


@pytest.mark.slow
def test_head_from_takes_the_converted_graphs_own_node_names(
        data: dict[str, Any], keras_model: Path, tmp_path: Path) -> None:
    # The operator reads node names off tf2onnx's conversion; the package's graph has
    # short ones, so the import translates --head-from.
    import onnx

    from edgefleet.models.build.tf_convert import (
        open_saved_model,
        saved_model_for,
        saved_model_to_onnx,
    )

    with saved_model_for(keras_model) as (sm_dir, _):
        sm = open_saved_model(sm_dir)
        saved_model_to_onnx(sm, (8, 8, 1), tmp_path / "converted.onnx")
    nodes = onnx.load(str(tmp_path / "converted.onnx")).graph.node
    last = next(n.name for n in reversed(nodes) if n.op_type in ("MatMul", "Gemm"))
    assert "/" in last  # tf2onnx's scope name
    res = import_model(import_opts(data, keras_model, tmp_path / "pkg", head_from=last,
                                   methods=("minmax",)))
    head = res.manifest.head
    assert head is not None and head.auto is False and re.fullmatch(r"n\d+", head.node)
    assert head.trainable
    assert res.manifest.lineage["model"]["source_names"]["head_node"] == last


def test_entropy_searches_thresholds_and_is_deterministic(mlp_onnx: Path, data: dict[str, Any],
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    # onnxruntime's entropy defaults (128 bins, 128 quantized bins) leave one threshold,
    # the full range: the file was MinMax's byte for byte. With CALIB_OPTIONS, on rows
    # with a rare outlier (one pixel 20x brighter), entropy clips the range and MinMax
    # does not; calibrating twice gives the same bytes (import-twice reproducibility).
    with np.load(data["calib_flat"]) as f:
        x = (f["x"][:300] / 16).astype(np.float32)
    x[0, 20] = 20.0

    def quantize(name: str, method: Any) -> bytes:
        out = quantize_onnx_int8(mlp_onnx, tmp_path / name, x, method=method, **IMPORT_INT8)
        return out.read_bytes()

    minmax = quantize("minmax.onnx", "minmax")
    entropy = quantize("entropy.onnx", "entropy")
    assert entropy != minmax
    assert quantize("entropy2.onnx", "entropy") == entropy
    assert quantize("percentile.onnx", "percentile") not in (minmax, entropy)
    monkeypatch.setitem(CALIB_OPTIONS, "entropy",
                        {"num_bins": 128, "num_quantized_bins": 128, "symmetric": False})
    assert quantize("entropy-ort-defaults.onnx", "entropy") == minmax


def test_shorten_names_keeps_the_graph_and_its_input_and_output(
        mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    long = tmp_path / "long.onnx"
    proto = onnx.load(str(mlp_onnx))
    for node in proto.graph.node:  # tf2onnx-like scope names
        node.name = f"StatefulPartitionedCall/sequential/{node.name}/BiasAdd"
    onnx.save_model(proto, str(long))
    short = Path(shutil.copyfile(long, tmp_path / "short.onnx"))
    renamed = shorten_names(short)
    assert renamed.nodes["StatefulPartitionedCall/sequential/MatMul1/BiasAdd"] == "n3"
    assert renamed.tensors["a0"] == "t4" and renamed.tensors["input"] == "input"
    assert _graph_io(short) == _graph_io(long) == ("input", "logits")
    assert all(re.fullmatch(r"[nt]\d+|input|logits", n) for n in _names(short))
    assert short.stat().st_size < long.stat().st_size
    x = (np.load(data["calib_flat"])["x"][:8] / 16).astype(np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0] for p in (long, short)]
    np.testing.assert_array_equal(run[0], run[1])


def test_int8_onnx_is_an_integer_graph_with_its_settings_recorded(
        mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    # A QDQ graph with int8 activations left float DequantizeLinear->op->QuantizeLinear
    # chains on x86 (docs/bench/mobilenetv2.md): the variant is now quantized after
    # quant_pre_process into QOperator uint8 kernels, one Q at the input, one DQ at the end.
    res = import_model(import_opts(data, mlp_onnx, tmp_path / "mlp", calibration=data["calib_flat"],
                                   eval=data["eval_flat"], methods=("minmax",)))
    in_file, optimized = int8_graph_ops(res.path / "model_int8.onnx")
    for ops in (in_file, optimized):
        assert not FLOAT_COMPUTE & set(ops), ops
        assert ops["QGemm"] == 2 and ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1
    q = res.manifest.lineage["quantization"]["onnx"]
    assert q["preprocess"]["tool"].endswith("quant_pre_process")
    assert (q["format"], q["activations"], q["weights"]) == ("QOperator", "uint8", "int8")
    assert q["per_channel"] is True and q["reduce_range"] is True
    assert q["calibrator_options"] == {"minmax": {}}


def test_head_from_names_a_node(mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    kw = {"calibration": data["calib_flat"], "eval": data["eval_flat"], "methods": ("minmax",)}
    res = import_model(import_opts(data, mlp_onnx, tmp_path / "a", head_from="MatMul0", **kw))
    assert res.manifest.head is not None and res.manifest.head.node == "MatMul0"
    assert res.manifest.head.dim == 64 and res.manifest.head.auto is False
    with pytest.raises(ImportRejected, match="MatMul0") as exc:
        import_model(import_opts(data, mlp_onnx, tmp_path / "b", head_from="nope", **kw))
    assert exc.value.reason == "head_node"


def test_per_channel_preprocessing_becomes_the_devices_normalization(
        mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    # NWC windows of 32 samples x 2 channels: per-channel mean/std expand per feature
    from edgefleet.device.runtime.manifest import Preprocessing
    from edgefleet.models.build.importer import _normalization

    pre = Preprocessing(scale=0.5, mean=[1.0, 2.0], std=[4.0, 8.0])
    norm = _normalization(pre, (32, 2), "NWC")
    x = np.random.default_rng(0).normal(size=(32, 2))
    got = (x.ravel() - np.array(norm.mean)) / np.array(norm.std)
    want = (x * 0.5 - np.array([1.0, 2.0])) / np.array([4.0, 8.0])
    np.testing.assert_allclose(got, want.ravel())
    norm_c = _normalization(pre, (2, 4, 4), "NCHW")
    assert norm_c.mean[:16] == [2.0] * 16 and norm_c.mean[16:] == [4.0] * 16


def test_cli_import_then_inspect(mlp_onnx: Path, data: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgefleet.server.cli import app

    runner = CliRunner()
    out = tmp_path / "pkg"
    res = runner.invoke(app, ["models", "import", str(mlp_onnx), "--calibration",
                              str(data["calib_flat"]), "--eval", str(data["eval_flat"]),
                              "--labels", str(data["labels"]), "--scale", "1/16",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["input"]["preprocessing"]["scale"] == 1 / 16 and got["input"]["layout"] == "flat"
    assert got["metrics"]["onnx-int8"]["accuracy"] > 0.85
    assert got["lineage"]["model"]["sha256"] == file_sha256(mlp_onnx)
    res = runner.invoke(app, ["models", "inspect", str(out)])
    assert res.exit_code == 0 and "onnx-int8" in res.output and "lineage:" in res.output
    res = runner.invoke(app, ["models", "import", str(mlp_onnx), "--calibration",
                              str(data["calib"]), "--eval", str(data["eval_flat"]),
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and isinstance(res.exception, ImportRejected)
    assert "the model takes (n, 64) float32" in str(res.exception)


@pytest.mark.slow
def test_savedmodel_source(keras_model: Path, data: dict[str, Any], tmp_path: Path) -> None:
    from edgefleet.models.build.tflite_export import _import_tf

    _import_tf()
    import keras

    # ending in softmax: ONNX variants (softmax removed), no TFLite (it would output
    # probabilities), and the lineage says why
    model = keras.models.load_model(keras_model)
    model.export(str(tmp_path / "sm_softmax"), verbose=False)
    res = import_model(import_opts(data, tmp_path / "sm_softmax", tmp_path / "p1",
                             methods=("minmax",)))
    assert set(res.manifest.variants) == {"onnx-fp32", "onnx-int8"}
    assert "softmax" in res.manifest.lineage["quantization"]["tflite"]["skipped"]
    # nothing to rebuild a fine-tuned TFLite variant from, so no TensorFlow model is kept
    assert not (res.path / "source" / "saved_model").exists()
    # ending in logits: all three
    model.layers[-1].activation = keras.activations.linear
    sm = tmp_path / "cnn_savedmodel"
    model.export(str(sm), verbose=False)
    res = import_model(import_opts(data, sm, tmp_path / "pkg", methods=("minmax",)))
    m = res.manifest
    assert set(m.variants) == {"onnx-fp32", "onnx-int8", "tflite-int8"}
    assert m.metrics["tflite-int8"]["ece"] < 0.1
    # kept (never listed, so never shipped) for a fine-tuned head's TFLite variant
    assert (res.path / "source" / "saved_model" / "saved_model.pb").is_file()
    assert not any(f.startswith("source") for f in m.files)
    assert m.lineage["model"]["kind"] == "savedmodel" and len(m.lineage["model"]["sha256"]) == 64
    assert m.metrics["onnx-int8"]["accuracy"] > 0.85
    assert Predictor.load(res.path, backend="tflite", threads=1).predict(
        data["x_eval"][0]).label in range(10)


def test_packages_without_the_new_keys_stay_as_older_readers_expect() -> None:
    # The additions are written only when set: a built (MLP) package's manifest has none
    # of them, so agents that predate them (strict: unknown keys are errors) accept it.
    from edgefleet.device.runtime.manifest import (
        InputSpec,
        Manifest,
        Normalization,
        Variant,
        manifest_json,
    )

    m = Manifest(name="m", version="1.0.0", task="digits", created="2026-01-01T00:00:00+00:00",
                 labels=["a", "b"], input=InputSpec(shape=[2]),
                 normalization=Normalization(mean=[0.0], std=[1.0]),
                 variants={"onnx-fp32": Variant(file="f.onnx", format="onnx",
                                                precision="fp32")},
                 default_variant="onnx-fp32", files={})
    raw = json.loads(manifest_json(m))
    assert "head" not in raw and set(raw["input"]) == {"dtype", "shape", "min_value",
                                                       "max_value"}
    assert "input_shape" not in raw["variants"]["onnx-fp32"]
    assert Manifest.model_validate(raw) == m


# -- bad input: each a clear error with a stable reason and a counter ----------------------


def _graph(path: Path, *, in_dims: list[Any] | None = ("batch", 4), op: str = "MatMul",  # type: ignore[assignment]
           domain: str = "", weight: np.ndarray | None = None, external: bool = False) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((4, 3), np.float32) if weight is None else weight
    node = helper.make_node(op, ["x", "W"], ["logits"], name="head", domain=domain)
    inp = (helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_dims))
           if in_dims is not None else helper.make_value_info(
               "x", helper.make_tensor_type_proto(TensorProto.FLOAT, shape=None)))
    graph = helper.make_graph([node], "g", [inp],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                             ["batch", 3])],
                              [numpy_helper.from_array(w, "W")])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(proto, str(path))
    return path


@pytest.fixture()
def small_data(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)
    return {"calibration": save_npz(tmp_path / "c.npz", x, y),
            "eval": save_npz(tmp_path / "e.npz", x, y)}


def _rejects(reason: str, model: Path, out: Path, data: dict[str, Path], match: str,
             **kw: Any) -> None:
    before = default_metrics().counter(f"import_rejected_{reason}")
    opts = ImportOptions(model=model, out=out, calibration=data["calibration"],
                         eval=data["eval"], **kw)
    with pytest.raises(ImportRejected, match=match) as exc:
        import_model(opts)
    assert exc.value.reason == reason
    assert not out.exists()
    assert default_metrics().counter(f"import_rejected_{reason}") == before + 1


def test_a_good_small_graph_imports(tmp_path: Path, small_data: dict[str, Path]) -> None:
    res = import_model(ImportOptions(model=_graph(tmp_path / "m.onnx"), out=tmp_path / "ok",
                                     methods=("minmax",), **small_data))
    assert res.manifest.input.shape == [4] and res.manifest.head is not None


def test_dynamic_and_missing_input_shapes_are_refused(tmp_path: Path,
                                                      small_data: dict[str, Path]) -> None:
    _rejects("dynamic_shape", _graph(tmp_path / "d.onnx", in_dims=["batch", "features"]),
             tmp_path / "o1", small_data, r"every dim but the batch must be fixed")
    _rejects("dynamic_shape", _graph(tmp_path / "n.onnx", in_dims=None), tmp_path / "o2",
             small_data, r"has no shape")


def test_unsupported_operators_are_named(tmp_path: Path, small_data: dict[str, Path]) -> None:
    _rejects("unsupported_op", _graph(tmp_path / "u.onnx", op="FancyMatMul",
                                      domain="com.example"),
             tmp_path / "o", small_data, r"com\.example\.FancyMatMul")


def test_calibration_data_of_the_wrong_shape_or_dtype(tmp_path: Path,
                                                      small_data: dict[str, Path]) -> None:
    model = _graph(tmp_path / "m.onnx")
    y = np.zeros(10, np.int64)
    wrong_shape = save_npz(tmp_path / "s.npz", np.zeros((10, 5), np.float32), y)
    _rejects("data_shape", model, tmp_path / "o1", {**small_data, "calibration": wrong_shape},
             r"shape \(10, 5\); the model takes \(n, 4\) float32")
    wrong_dtype = save_npz(tmp_path / "t.npz", np.array([["a"] * 4] * 10), y)
    _rejects("data_dtype", model, tmp_path / "o2", {**small_data, "calibration": wrong_dtype},
             r"dtype <U1; expected float32")
    nonfinite = save_npz(tmp_path / "f.npz", np.full((10, 4), np.nan, np.float32), y)
    _rejects("data_nonfinite", model, tmp_path / "o3", {**small_data, "calibration": nonfinite},
             "NaN")


def test_label_count_mismatches(tmp_path: Path, small_data: dict[str, Path]) -> None:
    model = _graph(tmp_path / "m.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    _rejects("labels_mismatch", model, tmp_path / "o1", small_data,
             r"labels file labels.txt has 2 names; the model has 3 outputs", labels=labels)
    too_many = save_npz(tmp_path / "y.npz", np.zeros((10, 4), np.float32), np.arange(10))
    _rejects("labels_mismatch", model, tmp_path / "o2", {**small_data, "eval": too_many},
             r"labels 0\.\.9; the model has 3 outputs")
    short_y = save_npz(tmp_path / "z.npz", np.zeros((10, 4), np.float32), np.zeros(9, np.int64))
    _rejects("labels_mismatch", model, tmp_path / "o3", {**small_data, "eval": short_y},
             r"10 integer labels")


def test_non_finite_weights(tmp_path: Path, small_data: dict[str, Path]) -> None:
    w = np.ones((4, 3), np.float32)
    w[1, 2] = np.inf
    _rejects("nonfinite_weights", _graph(tmp_path / "w.onnx", weight=w), tmp_path / "o",
             small_data, r"weight 'W' has 1 NaN/inf")


def test_models_over_the_package_size_limit(tmp_path: Path, small_data: dict[str, Path]) -> None:
    model = _graph(tmp_path / "m.onnx", weight=np.ones((4, 3), np.float32))
    _rejects("too_large", model, tmp_path / "o", small_data, r"at most 100 bytes",
             max_bytes=100)


def test_onnx_with_external_data(tmp_path: Path, small_data: dict[str, Path]) -> None:
    _rejects("external_data", _graph(tmp_path / "x.onnx", external=True), tmp_path / "o",
             small_data, r"references external data.*save_as_external_data=False")


def test_unknown_formats(tmp_path: Path, small_data: dict[str, Path]) -> None:
    (tmp_path / "m.pt").write_bytes(b"\0" * 10)
    _rejects("format", tmp_path / "m.pt", tmp_path / "o", small_data,
             r"expected \.onnx, \.keras, \.tflite or a SavedModel")


def test_created_follows_source_date_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.models.build.pipeline import created_now

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    assert created_now() == "1970-01-01T00:00:00+00:00"
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert created_now() != "1970-01-01T00:00:00+00:00"
    assert os.environ.get("SOURCE_DATE_EPOCH") is None
