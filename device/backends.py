"""Inference backends: onnxruntime and LiteRT behind one small interface.

A backend takes *normalized* float32 rows and returns float32 logits; int8 input
quantization and output dequantization of full-integer TFLite models happen here, from
the variant's quantization parameters, so callers never see the integer domain.
LiteRT comes from ``ai-edge-litert`` (the maintained successor of tflite-runtime) and
falls back to ``tflite_runtime`` where only that is installed.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.device.errors import MissingExtraError, PackageError
from edgefleet.device.package import Variant

__all__ = ["DEFAULT_THREADS", "InferenceBackend", "LiteRTBackend", "OnnxBackend", "open_backend"]

F32 = npt.NDArray[np.float32]

#: A Raspberry Pi 4/5 has 4 cores; leave one for the daemon's I/O threads.
DEFAULT_THREADS = 3


class InferenceBackend(abc.ABC):
    """Runs one model variant on normalized float32 input, returning float32 logits."""

    name: str

    @abc.abstractmethod
    def run(self, x: F32) -> F32:
        """Logits for a batch ``(n, *input_shape)``."""

    @abc.abstractmethod
    def run_raw(self, feed: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The bare runtime call on an already prepared input (benchmark baseline)."""

    def prepare(self, x: F32) -> npt.NDArray[Any]:
        """Turn normalized float rows into what :meth:`run_raw` takes."""
        return x


class OnnxBackend(InferenceBackend):
    """onnxruntime ``InferenceSession`` on the CPU execution provider."""

    name = "onnx"

    def __init__(self, path: Path, variant: Variant, threads: int = DEFAULT_THREADS) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingExtraError("ONNX inference", "device", "onnxruntime") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts,
                                              providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise PackageError(f"{path.name}: onnxruntime cannot load it: {exc}") from None
        self._in = variant.input_name
        self._out = [variant.output_name]

    def run_raw(self, feed: npt.NDArray[Any]) -> npt.NDArray[Any]:
        out: npt.NDArray[Any] = self._sess.run(self._out, {self._in: feed})[0]
        return out

    def run(self, x: F32) -> F32:
        return np.asarray(self.run_raw(np.ascontiguousarray(x, dtype=np.float32)),
                          dtype=np.float32)


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise MissingExtraError("TFLite inference", "device", "ai-edge-litert") from None
    return Interpreter


class LiteRTBackend(InferenceBackend):
    """LiteRT ``Interpreter``; resizes its input for each batch size it sees."""

    name = "tflite"

    def __init__(self, path: Path, variant: Variant, threads: int = DEFAULT_THREADS) -> None:
        interpreter_cls = _litert_interpreter()
        try:
            self._it = interpreter_cls(model_path=str(path), num_threads=threads)
            self._it.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError on bad files
            raise PackageError(f"{path.name}: LiteRT cannot load it: {exc}") from None
        self._inp = self._it.get_input_details()[0]
        self._outp = self._it.get_output_details()[0]
        self._in_q = variant.input_quant
        self._out_q = variant.output_quant
        self._batch = int(self._inp["shape"][0])

    def prepare(self, x: F32) -> npt.NDArray[Any]:
        if self._in_q is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        # In-place ufuncs: np.round/np.clip cost a microsecond each on a batch-1 hot path.
        q = np.divide(x, self._in_q.scale, dtype=np.float32)
        np.rint(q, out=q)
        np.add(q, self._in_q.zero_point, out=q)
        np.maximum(q, -128, out=q)
        np.minimum(q, 127, out=q)
        out: npt.NDArray[np.int8] = q.astype(np.int8)
        return out

    def run_raw(self, feed: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if feed.shape[0] != self._batch:
            self._it.resize_tensor_input(self._inp["index"], list(feed.shape))
            self._it.allocate_tensors()
            self._batch = feed.shape[0]
        self._it.set_tensor(self._inp["index"], feed)
        self._it.invoke()
        out: npt.NDArray[Any] = self._it.get_tensor(self._outp["index"])
        return out

    def run(self, x: F32) -> F32:
        out = self.run_raw(self.prepare(x))
        if self._out_q is None:
            return np.asarray(out, dtype=np.float32)
        deq: F32 = np.subtract(out, self._out_q.zero_point, dtype=np.float32)
        np.multiply(deq, self._out_q.scale, out=deq)
        return deq


def open_backend(root: Path, variant: Variant, threads: int = DEFAULT_THREADS) -> InferenceBackend:
    """The backend for ``variant`` of the package in ``root``."""
    path = root / variant.file
    if variant.format == "onnx":
        return OnnxBackend(path, variant, threads)
    return LiteRTBackend(path, variant, threads)
