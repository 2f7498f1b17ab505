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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.errors import MissingExtraError
from edgefleet.device.runtime.mlp import MLP

__all__ = ["CALIB_METHODS", "IMPORT_INT8", "CalibMethod", "export_onnx_fp32",
           "quantize_onnx_int8", "save_graph"]

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
    ``percentile`` (``models import`` picks one by held-out accuracy). ``reduce_range``
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
    # into one array, so their batches must all be the same size: one row each.
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

    # The histogram calibrators print progress to stdout, which is the CLIs' JSON channel.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.ExitStack() as stack:
        source = fp32_path
        if preprocess:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix=".preprocess.", dir=int8_path.parent)))
            source = tmp / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        quantize_static(
            str(source),
            str(int8_path),
            _Reader(),
            quant_format=QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax,
                              "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return int8_path
