"""Refuse ONNX files that reference external data, before onnxruntime sees them.

ONNX lets a tensor keep its bytes in another file (``external_data``, a relative path
that has been abused with ``../`` and absolute paths). A package is self-contained, so
any external reference is refused. The check walks the protobuf wire format along the
few ONNX message paths that can hold tensors, so a device needs no ``onnx`` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from edgefleet.device.core.errors import PackageError

__all__ = ["check_no_external_data"]

# message -> {field number: sub-message}, from onnx.proto (ModelProto, GraphProto, ...)
_SCHEMA: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attr"},
    "attr": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_MAX_DEPTH = 32


class _WireError(ValueError):
    pass


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _WireError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, value
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _varint(buf, i)
            if i + length > len(buf):
                raise _WireError("length past the end")
            yield field, buf[i:i + length]
            i += length
        elif wire == 5:
            i += 4
        else:
            raise _WireError(f"wire type {wire}")
    if i != len(buf):
        raise _WireError("truncated field")


def _has_external(buf: memoryview, message: str, depth: int) -> bool:
    if depth > _MAX_DEPTH:
        raise _WireError("nesting too deep")
    children = _SCHEMA[message]
    for field, value in _fields(buf):
        if message == "tensor":
            if field == _TENSOR_EXTERNAL_DATA:
                return True
            if field == _TENSOR_DATA_LOCATION and value == 1:
                return True
        sub = children.get(field)
        if sub is not None and isinstance(value, memoryview) and _has_external(
            value, sub, depth + 1
        ):
            return True
    return False


def check_no_external_data(path: Path) -> None:
    """Raise :class:`PackageError` if the ONNX file at ``path`` uses external data."""
    data = memoryview(path.read_bytes())
    try:
        external = _has_external(data, "model", 0)
    except _WireError as exc:
        raise PackageError(f"{path.name}: not a valid ONNX protobuf ({exc})") from None
    if external:
        raise PackageError(f"{path.name}: references external data (not allowed in a package)")
