"""The serial sensor frame protocol (docs/serial-protocol.md): COBS, a header, CRC-32.

On the wire every frame is ``0x00 · COBS(header · payload · crc32) · 0x00``. COBS removes
every zero byte from the frame, so a zero always means "frame boundary": after garbage, a
cut cable or a flipped bit the decoder loses at most the frame it is in and picks up again
at the next zero. The leading zero makes each frame independent of its predecessor (a
destroyed trailing delimiter cannot take the next frame down with it). A frame longer than
the size limit is dropped while it streams in, so a babbling sensor cannot make the
reader buffer unbounded data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from edgefleet.device.core.metrics import Metrics, default_metrics

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "HEADER",
    "PROTOCOL_VERSION",
    "CobsError",
    "Frame",
    "FrameDecoder",
    "PayloadType",
    "cobs_decode",
    "cobs_encode",
    "decode_labels",
    "encode_frame",
    "encode_labels",
    "max_encoded_len",
    "payload_ok",
]

PROTOCOL_VERSION = 1
#: version u8, sensor id u16, sequence u32, timestamp µs u64, payload type u8, length u16.
HEADER = struct.Struct(">BHIQBH")
CRC = struct.Struct(">I")
#: 16 KiB: a 3-axis float32 window of 1024 samples (12 KiB) with room to spare.
DEFAULT_MAX_PAYLOAD = 16 * 1024
SEQ_MOD = 1 << 32


class PayloadType(IntEnum):
    """What the payload bytes are."""

    U8_VECTOR = 1  #: unsigned bytes, e.g. the 64 digits pixels (0..16)
    F32_VECTOR = 2  #: little-endian float32 values, e.g. precomputed features
    ACCEL_F32 = 3  #: 3-axis accelerometer window, float32 LE, interleaved x,y,z, in g
    LABEL = 4  #: ground truth for earlier frames of this sensor: (seq u32, class u16) BE each


#: One record of a ``LABEL`` payload: the labelled frame's sequence number and its class.
LABEL_RECORD = struct.Struct(">IH")


def encode_labels(pairs: list[tuple[int, int]]) -> bytes:
    """A ``LABEL`` payload: ``(seq, class)`` for earlier frames of the same sensor."""
    return b"".join(LABEL_RECORD.pack(seq % SEQ_MOD, cls) for seq, cls in pairs)


def decode_labels(payload: bytes) -> list[tuple[int, int]]:
    """The ``(seq, class)`` records of a ``LABEL`` payload; ``ValueError`` if it is not
    a whole, non-empty number of records."""
    if not payload or len(payload) % LABEL_RECORD.size:
        raise ValueError(f"label payload of {len(payload)} bytes is not a whole number of "
                         f"{LABEL_RECORD.size}-byte records")
    return [LABEL_RECORD.unpack_from(payload, i)
            for i in range(0, len(payload), LABEL_RECORD.size)]


class CobsError(ValueError):
    """Bytes that are not a valid COBS encoding."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    sensor_id: int
    seq: int
    timestamp_us: int
    payload_type: int
    payload: bytes
    version: int = PROTOCOL_VERSION

    def values(self) -> npt.NDArray[np.float32]:
        """The payload as float32 numbers (an accelerometer window as ``(n, 3)``).

        ValueError if the payload is not whole values of its type (never for a frame
        from :class:`FrameDecoder`, which rejects those).
        """
        if not payload_ok(self.payload_type, self.payload):
            raise ValueError(f"payload of {len(self.payload)} bytes is not whole values of "
                             f"type {self.payload_type}")
        if self.payload_type == PayloadType.LABEL:
            raise ValueError("a LABEL frame holds label records (decode_labels), not values")
        if self.payload_type == PayloadType.U8_VECTOR:
            return np.frombuffer(self.payload, dtype=np.uint8).astype(np.float32)
        arr = np.frombuffer(self.payload, dtype="<f4").astype(np.float32)
        if self.payload_type == PayloadType.ACCEL_F32:
            return arr.reshape(-1, 3)
        return arr


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: ``data`` without any zero byte, +1 byte per 254."""
    out = bytearray()
    for part in data.split(b"\x00"):
        pos = 0
        while len(part) - pos >= 254:
            out.append(0xFF)
            out += part[pos:pos + 254]
            pos += 254
        out.append(len(part) - pos + 1)
        out += part[pos:]
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises :class:`CobsError` on impossible input."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError(f"zero byte at offset {i}")
        end = i + code
        if end > n:
            raise CobsError(f"block at offset {i} runs {end - n} byte(s) past the end")
        out += data[i + 1:end]
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def max_encoded_len(max_payload: int) -> int:
    """Longest COBS chunk (without delimiters) a frame within ``max_payload`` can have."""
    raw = HEADER.size + max_payload + CRC.size
    return raw + raw // 254 + 1


def encode_frame(sensor_id: int, seq: int, timestamp_us: int, payload_type: int,
                 payload: bytes, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """The wire bytes of one frame, delimiters included."""
    if len(payload) > max_payload:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {max_payload}")
    if not payload_ok(payload_type, payload):
        raise ValueError(f"payload of {len(payload)} bytes is not whole values of type "
                         f"{payload_type}")
    body = HEADER.pack(PROTOCOL_VERSION, sensor_id, seq % SEQ_MOD, timestamp_us,
                       payload_type, len(payload)) + payload
    return b"\x00" + cobs_encode(body + CRC.pack(zlib.crc32(body))) + b"\x00"


class FrameDecoder:
    """Turns a byte stream, in pieces of any size, into frames; counts what went wrong.

    Counters (``serial_`` prefix): ``frames_ok``, ``crc_errors``, ``malformed`` (bad COBS,
    short, unknown version or type, length mismatch), ``bad_payload`` (a valid frame whose
    payload length is not whole values of its type, e.g. 7 bytes of float32), ``oversize``,
    ``resyncs`` (a
    non-empty chunk discarded: the decoder picked up again at the next delimiter),
    ``bytes_discarded``, ``seq_gaps`` and ``frames_missed`` (from per-sensor sequence
    numbers).
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 metrics: Metrics | None = None, prefix: str = "serial_") -> None:
        self.max_chunk = max_encoded_len(max_payload)
        self.max_payload = max_payload
        self.metrics = metrics if metrics is not None else default_metrics()
        self._p = prefix
        self._buf = bytearray()
        self._skipping = False
        self._last_seq: dict[int, int] = {}

    def _count(self, name: str, n: int = 1) -> None:
        self.metrics.inc(self._p + name, n)

    def reset(self) -> None:
        """Forget a partial frame (after a reconnect: its rest will never come)."""
        if self._buf or self._skipping:
            self._discard(len(self._buf))
        self._buf.clear()
        self._skipping = False

    def _discard(self, nbytes: int) -> None:
        self._count("resyncs")
        if nbytes:
            self._count("bytes_discarded", nbytes)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return the frames it completed."""
        out: list[Frame] = []
        start, n = 0, len(data)
        while start <= n:
            i = data.find(b"\x00", start)
            piece = data[start:] if i < 0 else data[start:i]
            if self._skipping:
                if piece:
                    self._count("bytes_discarded", len(piece))
            elif len(self._buf) + len(piece) > self.max_chunk:
                self._count("oversize")
                self._discard(len(self._buf) + len(piece))
                self._buf.clear()
                self._skipping = True
            elif i < 0:
                self._buf += piece
            else:
                chunk = bytes(self._buf) + piece if self._buf else piece
                self._buf.clear()
                if chunk:
                    frame = self._parse(chunk)
                    if frame is not None:
                        out.append(frame)
            if i < 0:
                break
            self._skipping = False
            start = i + 1
        return out

    def _parse(self, chunk: bytes) -> Frame | None:
        try:
            raw = cobs_decode(chunk)
        except CobsError:
            return self._bad("malformed", len(chunk))
        if len(raw) < HEADER.size + CRC.size:
            return self._bad("malformed", len(chunk))
        body, (crc,) = raw[:-CRC.size], CRC.unpack_from(raw, len(raw) - CRC.size)
        if zlib.crc32(body) != crc:
            return self._bad("crc_errors", len(chunk))
        version, sensor, seq, ts, ptype, length = HEADER.unpack_from(body)
        if version != PROTOCOL_VERSION or length != len(body) - HEADER.size or \
                ptype not in _PAYLOAD_TYPES:
            return self._bad("malformed", len(chunk))
        if length % _VALUE_SIZE[ptype]:
            # The CRC only says the sensor sent these bytes, not that they are whole
            # values: 7 bytes of float32 would fail in Frame.values() on every frame.
            return self._bad("bad_payload", len(chunk))
        self._count("frames_ok")
        last = self._last_seq.get(sensor)
        if last is not None and seq != (last + 1) % SEQ_MOD:
            self._count("seq_gaps")
            missed = (seq - last - 1) % SEQ_MOD
            if missed < SEQ_MOD // 2:  # a jump back is a sensor restart, not a loss
                self._count("frames_missed", missed)
        if len(self._last_seq) > 4096 and sensor not in self._last_seq:
            self._last_seq.clear()  # bound memory against forged sensor ids
        self._last_seq[sensor] = seq
        return Frame(sensor, seq, ts, ptype, body[HEADER.size:], version)

    def _bad(self, counter: str, nbytes: int) -> Frame | None:
        """Count a discarded chunk; returns None so ``_parse`` can ``return self._bad(...)``."""
        self._count(counter)
        self._discard(nbytes)
        return None


_PAYLOAD_TYPES = frozenset(int(t) for t in PayloadType)
#: Bytes per value of each payload type: a payload must be a whole number of them.
_VALUE_SIZE = {int(PayloadType.U8_VECTOR): 1, int(PayloadType.F32_VECTOR): 4,
               int(PayloadType.ACCEL_F32): 12, int(PayloadType.LABEL): LABEL_RECORD.size}


def payload_ok(payload_type: int, payload: bytes) -> bool:
    """Whether ``payload`` is a whole number of values of ``payload_type``."""
    size = _VALUE_SIZE.get(payload_type)
    return size is not None and len(payload) % size == 0
