"""Export the NumPy MLP to ONNX and quantize it to int8 with onnxruntime.

The fp32 graph is built with ``onnx.helper`` (MatMul + Add + Relu), so it needs no
training framework. Quantization is onnxruntime's static quantization with per-channel
int8 weights and activation ranges calibrated on training data. The built-in MLPs ship QDQ
with int8 activations; ``models import`` asks for ``quant_pre_process`` and uint8
activations, which onnxruntime's x86 CPU kernels fuse completely (docs/bench/mobilenetv2.md).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import MissingExtraError, ModelError
from edgefleet.device.runtime.mlp import MLP

__all__ = ["CALIB_METHODS", "CALIB_OPTIONS", "IMPORT_INT8", "CalibMethod", "Renamed",
           "export_onnx_fp32", "quantize_onnx_int8", "save_graph", "shorten_names"]

OPSET = 17
CalibMethod = Literal["minmax", "entropy", "percentile"]
CALIB_METHODS: tuple[CalibMethod, ...] = ("minmax", "entropy", "percentile")
#: How ``models import`` quantizes int8 ONNX (``quantize_onnx_int8`` keywords; the
#: calibration method is chosen per model); docs/bench/mobilenetv2.md has the numbers.
#: Without ``quant_pre_process``, batch norm's Mul/Add and Keras' Pad stay separate nodes
#: with their own Q/DQ pairs; with int8 activations onnxruntime's x86 CPU provider leaves
#: residual Adds and some 1x1 convolutions as float DequantizeLinear->op->QuantizeLinear
#: chains, with NHWC<->NCHW Transposes around them; uint8 activations fuse every node into
#: an integer kernel. QOperator writes those kernels (QLinearConv, QLinearAdd, QGemm) into
#: the file, so every device runs the same integer graph whatever its onnxruntime would
#: fuse at load time, and the file carries no Q/DQ nodes. 7-bit weights (``reduce_range``)
#: keep x86 CPUs without VNNI from saturating their 16-bit u8*s8 pair sums, so they compute
#: what the build machine computed.
IMPORT_INT8: dict[str, Any] = {"quant_format": "qoperator", "activations": "uint8",
                               "per_channel": True, "reduce_range": True, "preprocess": True}
#: The histogram calibrators' settings (onnxruntime ``create_calibrator`` keywords), which
#: ``quantize_static`` does not forward, so :func:`quantize_onnx_int8` calibrates these
#: methods itself and hands onnxruntime the ranges. onnxruntime's entropy defaults (128
#: bins, 128 quantized bins) leave one candidate threshold, the full range: entropy wrote
#: MinMax's file byte for byte. 512 bins give 193 thresholds to compare; the KL search is
#: quadratic in the bins (2048 took a minute per MobileNetV2 import, for no better
#: accuracy: docs/bring-your-own-model.md). Percentile keeps onnxruntime's defaults,
#: written out so the lineage records them.
CALIB_OPTIONS: dict[CalibMethod, dict[str, Any]] = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128, "symmetric": False},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
}


def export_onnx_fp32(model: MLP, path: Path, input_name: str = "input",
                     output_name: str = "logits") -> Path:
    """Write ``model`` as a self-contained ONNX file (no external data) at ``path``."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise MissingExtraError("ONNX export", "models", "onnx") from None

    nodes = []
    inits = []
    prev = input_name
    for i in range(model.n_layers):
        w, b = model.params[2 * i], model.params[2 * i + 1]
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        last = i == model.n_layers - 1
        mm, add = f"mm{i}", output_name if last else f"z{i}"
        nodes += [helper.make_node("MatMul", [prev, f"W{i}"], [mm], name=f"MatMul{i}"),
                  helper.make_node("Add", [mm, f"B{i}"], [add], name=f"Add{i}")]
        if not last:
            nodes.append(helper.make_node("Relu", [add], [f"a{i}"], name=f"Relu{i}"))
            prev = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "edgefleet_mlp",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", model.sizes[0]])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT,
                                       ["batch", model.sizes[-1]])],
        inits,
    )
    return save_graph(graph, path)


def save_graph(graph: Any, path: Path) -> Path:
    """Wrap ``graph`` in a model (our opset and IR version), check it and write it."""
    import onnx
    from onnx import helper

    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edgefleet")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path


def quantize_onnx_int8(fp32_path: Path, int8_path: Path, calib_x: npt.NDArray[np.float32],
                       input_name: str = "input", per_channel: bool = True, *,
                       quant_format: Literal["qdq", "qoperator"] = "qdq",
                       activations: Literal["int8", "uint8"] = "int8",
                       method: CalibMethod = "minmax", reduce_range: bool = False,
                       preprocess: bool = False) -> Path:
    """Static int8 quantization of ``fp32_path`` calibrated on ``calib_x`` (normalized).

    The defaults (QDQ, int8 activations) are what packages ship; ``quant_format`` and
    ``activations`` exist so the benchmark can show onnxruntime's other int8 kernels
    (QOperator ``QLinearConv``, uint8 activations as x86 CPUs without VNNI prefer).
    ``method`` is how activation ranges are calibrated: ``minmax``, ``entropy`` or
    ``percentile`` (``models import`` picks one by held-out accuracy; the histogram
    methods' settings are :data:`CALIB_OPTIONS`). ``reduce_range``
    quantizes weights to 7 bits. ``preprocess`` runs onnxruntime's ``quant_pre_process``
    first (ONNX shape inference and onnxruntime's graph optimizations: batch norm's Mul/Add
    and Pad folded into the convolutions, MatMul+Add into Gemm), so fewer, larger operators
    are quantized and none is left between a DequantizeLinear and a QuantizeLinear that
    onnxruntime cannot fuse. Symbolic shape inference is skipped: imported models have fixed
    sample shapes, and it would need sympy.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    # The histogram calibrators (entropy, percentile) stack every batch's activations
    # into one array, so their batches must all be the same size: one row each. They
    # compute from the whole histogram at once, so their ranges are deterministic.
    step = 32 if method == "minmax" else 1

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        """Feeds calibration rows in small batches, as onnxruntime expects."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, npt.NDArray[np.float32]]] = (
                {input_name: calib_x[i : i + step].astype(np.float32)}
                for i in range(0, len(calib_x), step)
            )

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            return next(self._it, None)

    calib_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile}[method]
    # The histogram calibrators print progress to stdout, which is the CLIs' JSON channel.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix=".quantize.", dir=int8_path.parent)))
        source = fp32_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = tmp / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        reader: _Reader | None = _Reader()
        cache = None
        if CALIB_OPTIONS[method]:
            cache = tmp / "ranges.json"
            _histogram_ranges(source, calib_method, CALIB_OPTIONS[method], reader, cache)
            reader = None
        quantize_static(
            str(source),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calib_method,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            calibration_cache_path=cache,
        )
    return int8_path


def _histogram_ranges(model: Path, method: Any, options: dict[str, Any], reader: Any,
                      cache: Path) -> None:
    """Activation ranges of ``model`` by a histogram calibrator with ``options``, written as
    onnxruntime's calibration cache (``quantize_static`` reads it instead of calibrating)."""
    import inspect

    from onnxruntime.quantization import create_calibrator, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ModelError("entropy/percentile calibration with edgefleet's histogram settings "
                         "needs an onnxruntime whose quantize_static takes "
                         "calibration_cache_path (1.32 does); upgrade onnxruntime or "
                         "quantize with minmax")
    from onnxruntime.quantization import save_tensors_data


    calibrator = create_calibrator(
        model, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # as quantize_static
        augmented_model_path=str(cache.with_name("augmented.onnx")), calibrate_method=method,
        extra_options=options)
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


class Renamed(NamedTuple):
    """Old name -> new name, for nodes and for tensors (separate namespaces in ONNX)."""

    nodes: dict[str, str]
    tensors: dict[str, str]


def shorten_names(path: Path) -> Renamed:
    """Rename the nodes (``n0``, ``n1``, ...) and tensors (``t0``, ...) of the ONNX file
    ``path`` in order of first use, keeping the graph's input and output names; returns
    the renaming (an old node name given as ``--head-from`` is translated with it).

    tf2onnx names every node and tensor after its TensorFlow scope
    (``StatefulPartitionedCall/.../block_16_project/Conv2D``): about 100 KiB of a
    MobileNetV2-0.35 int8 file, whose weights are 0.4 MiB. A graph with subgraphs (If,
    Loop) refers to outer tensors by name from inside them; it is left as it is.
    """
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in graph.node for a in n.attribute):
        return Renamed({}, {})
    keep = {v.name for v in (*graph.input, *graph.output)} | {""}
    tensors = {k: k for k in keep}
    used = set(keep)
    count = {"n": 0, "t": 0}

    def fresh(prefix: str) -> str:
        while (name := f"{prefix}{count[prefix]}") in used:
            count[prefix] += 1
        used.add(name)
        return name

    def tensor(name: str) -> str:
        if name not in tensors:
            tensors[name] = fresh("t")
        return tensors[name]

    nodes: dict[str, str] = {}
    for node in graph.node:
        new = fresh("n")
        if node.name:
            nodes[node.name] = new
        node.name = new
        node.input[:] = [tensor(i) for i in node.input]
        node.output[:] = [tensor(o) for o in node.output]
    for coll in (graph.initializer, graph.value_info, graph.input, graph.output):
        for item in coll:
            item.name = tensor(item.name)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))
    return Renamed(nodes, tensors)
