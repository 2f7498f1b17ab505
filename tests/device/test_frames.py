"""The frame protocol: COBS and frame roundtrips, garbage resilience, limits, counters."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.wire.frames import (
    HEADER,
    CobsError,
    FrameDecoder,
    PayloadType,
    cobs_decode,
    cobs_encode,
    decode_labels,
    encode_frame,
)
from edgefleet.models.sim.serial_faults import FaultInjector, Faults, corrupt_bytes

_VALUE = {PayloadType.U8_VECTOR: 1, PayloadType.F32_VECTOR: 4, PayloadType.ACCEL_F32: 12,
          PayloadType.LABEL: 6}


def _whole(t: PayloadType, data: bytes) -> bytes:
    return data[:len(data) - len(data) % _VALUE[t]]


frames_st = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1),
              st.sampled_from(list(PayloadType)), st.binary(max_size=700))
    .map(lambda f: (*f[:4], _whole(f[3], f[4]))),
    max_size=8)


@given(st.binary(max_size=2000))
def test_cobs_roundtrip_has_no_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert b"\x00" not in enc
    assert cobs_decode(enc) == data
    assert len(enc) <= len(data) + len(data) // 254 + 1


def test_cobs_rejects_impossible_input() -> None:
    for bad in (b"\x05ab", b"\x02a\x00"):
        try:
            cobs_decode(bad)
        except CobsError:
            continue
        raise AssertionError(f"{bad!r} decoded")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@settings(max_examples=150)
@given(frames_st, st.binary(max_size=300), st.lists(st.integers(0, 10**6), max_size=10))
def test_frames_survive_garbage_and_any_chunking(frames, garbage: bytes, cuts: list[int]) -> None:
    m = Metrics()
    dec = FrameDecoder(metrics=m)
    wire = garbage + b"".join(encode_frame(*f) for f in frames)
    got = [g for piece in _split(wire, cuts) for g in dec.feed(piece)]
    assert [(g.sensor_id, g.seq, g.timestamp_us, g.payload_type, g.payload) for g in got] == \
        [(s, q, t, int(p), d) for s, q, t, p, d in frames]
    assert m.counter("serial_frames_ok") == len(frames)


@settings(max_examples=100)
@given(frames_st, st.integers(0, 2**32), st.floats(0.0, 0.05))
def test_random_corruption_loses_only_touched_frames(frames, seed: int, rate: float) -> None:
    wires = [encode_frame(*f) for f in frames]
    data, hits = corrupt_bytes(b"".join(wires), rate, random.Random(seed))
    touched, start = set(), 0
    for k, w in enumerate(wires):
        if any(start <= h < start + len(w) for h in hits):
            touched.add(k)
        start += len(w)
    dec = FrameDecoder(metrics=Metrics())
    got = {(g.sensor_id, g.seq, g.payload) for g in dec.feed(data)}
    for k, (s, q, _t, _p, d) in enumerate(frames):
        if k not in touched:
            assert (s, q, d) in got


def test_counters_for_each_fault() -> None:
    m = Metrics()
    dec = FrameDecoder(metrics=m, max_payload=256)
    payload = bytes(range(1, 65))
    good = [encode_frame(7, i, 1000 * i, PayloadType.U8_VECTOR, payload) for i in range(6)]
    bad_crc = bytearray(good[1])
    bad_crc[40] ^= 0x80  # a flipped payload bit (never a zero): COBS decodes, the CRC fails
    body = HEADER.pack(9, 7, 50, 0, 1, 0)  # unknown protocol version, valid CRC
    bad_version = b"\x00" + cobs_encode(body + struct.pack(">I", zlib.crc32(body))) + b"\x00"
    stream = (good[0] + bytes(bad_crc) + good[2] + b"\x00" + b"\x01" * 5000 + good[3]
              + bad_version + good[5])
    got = dec.feed(stream)
    assert [g.seq for g in got] == [0, 2, 3, 5]
    c = m.snapshot()["counters"]
    assert c["serial_frames_ok"] == 4
    assert c["serial_crc_errors"] == 1
    assert c["serial_oversize"] == 1
    assert c["serial_malformed"] == 1
    assert c["serial_resyncs"] == 3
    assert c["serial_seq_gaps"] == 2  # 0→2 and 3→5
    assert c["serial_frames_missed"] == 2
    assert c["serial_bytes_discarded"] >= 5000


def test_oversize_is_not_buffered() -> None:
    dec = FrameDecoder(metrics=Metrics(), max_payload=128)
    for _ in range(200):
        assert dec.feed(b"\x01" * 10_000) == []
        assert len(dec._buf) <= dec.max_chunk
    ok = encode_frame(1, 1, 1, PayloadType.F32_VECTOR, bytes(16))
    assert [f.seq for f in dec.feed(ok)] == [1]


def test_fault_injector_is_deterministic_and_reports_damage() -> None:
    faults = Faults.parse("bitflip=0.2,truncate=0.1,garbage=0.2,pause=0.1,pause_s=0.01")
    wire = [encode_frame(1, i, i, PayloadType.U8_VECTOR, bytes(range(64))) for i in range(300)]
    runs = []
    for _ in range(2):
        inj = FaultInjector(faults, seed=3)
        runs.append([inj.apply(w) for w in wire])
    assert runs[0] == runs[1]
    dec = FrameDecoder(metrics=Metrics())
    got = set()
    for chunks, _touched in runs[0]:
        for c in chunks:
            if isinstance(c, bytes):
                got |= {f.seq for f in dec.feed(c)}
    untouched = {i for i, (_c, t) in enumerate(runs[0]) if not t}
    assert 150 < len(untouched) < 300
    assert untouched <= got


def raw_frame(sensor: int, seq: int, ptype: int, payload: bytes) -> bytes:
    """A frame with a valid CRC whatever its payload (``encode_frame`` refuses odd ones)."""
    body = HEADER.pack(1, sensor, seq, 0, ptype, len(payload)) + payload
    return b"\x00" + cobs_encode(body + struct.pack(">I", zlib.crc32(body))) + b"\x00"


def test_valid_crc_odd_payload_is_a_counted_reject() -> None:
    m = Metrics()
    dec = FrameDecoder(metrics=m)
    good = [encode_frame(1, i, i, PayloadType.F32_VECTOR, bytes(16)) for i in range(3)]
    stream = (good[0] + raw_frame(1, 90, PayloadType.F32_VECTOR, bytes(7)) + good[1]
              + raw_frame(1, 91, PayloadType.ACCEL_F32, bytes(16)) + good[2])
    got = dec.feed(stream)
    assert [g.seq for g in got] == [0, 1, 2]
    for g in got:
        assert g.values().shape == (4,)
    c = m.snapshot()["counters"]
    assert c["serial_bad_payload"] == 2
    assert c["serial_frames_ok"] == 3


def test_encode_and_values_refuse_partial_values() -> None:
    import pytest

    from edgefleet.device.wire.frames import Frame

    with pytest.raises(ValueError, match="whole values"):
        encode_frame(1, 1, 1, PayloadType.ACCEL_F32, bytes(13))
    with pytest.raises(ValueError, match="whole values"):
        Frame(1, 1, 1, PayloadType.F32_VECTOR, bytes(7)).values()


@settings(max_examples=300)
@given(st.integers(0, 255), st.binary(max_size=200))
def test_any_valid_crc_frame_decodes_to_usable_values_or_is_counted(ptype: int,
                                                                    payload: bytes) -> None:
    m = Metrics()
    got = FrameDecoder(metrics=m).feed(raw_frame(5, 1, ptype, payload))
    for g in got:  # never raises for a delivered frame
        if g.payload_type == PayloadType.LABEL:
            if g.payload:
                decode_labels(g.payload)
        else:
            g.values()
    c = m.snapshot()["counters"]
    assert len(got) + c.get("serial_bad_payload", 0) + c.get("serial_malformed", 0) == 1


def test_label_payload_round_trip_and_refusals() -> None:
    from edgefleet.device.wire.frames import decode_labels, encode_labels

    pairs = [(0, 3), (41, 9), (2**32 - 1, 0)]
    wire = encode_frame(2, 42, 7, PayloadType.LABEL, encode_labels(pairs))
    (frame,) = FrameDecoder(metrics=Metrics()).feed(wire)
    assert frame.payload_type == PayloadType.LABEL
    assert decode_labels(frame.payload) == pairs
    for bad in (b"", b"\x00" * 5, b"\x00" * 13):
        with pytest.raises(ValueError, match="whole number"):
            decode_labels(bad)
