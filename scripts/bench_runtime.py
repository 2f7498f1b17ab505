"""Runtime benchmarks → docs/bench/runtime.md.

1. Predictor overhead: median batch-1 latency of ``Predictor.predict`` against the bare
   runtime call (``InferenceSession.run`` / LiteRT ``set_tensor+invoke+get_tensor``) on
   the same int8 model, in alternating blocks in one run (target ratio ≤ 1.15).
2. Serial reader throughput through a real pty (frames/s, MB/s).
3. The reader under 1 % corrupted bytes: every frame no corrupted byte landed in must
   be delivered.

Run: .venv/bin/python scripts/bench_runtime.py
"""

from __future__ import annotations

import os
import queue
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.device.core.metrics import Metrics
from edgefleet.device.inference.bench import bench_package
from edgefleet.device.input.serial_reader import SerialReader
from edgefleet.device.wire.frames import Frame, PayloadType, encode_frame
from edgefleet.models.sim.serial_faults import corrupt_bytes

RUNS = 4000


def _build(tmp: Path, task: str, hidden: tuple[int, ...] | None) -> Path:
    from edgefleet.models.build.pipeline import BuildOptions, build_package

    out = tmp / f"{task}-{'x'.join(map(str, hidden or ())) or 'default'}"
    build_package(BuildOptions(task=task, out=out, formats="all", hidden=hidden, seed=0))
    return out


def predictor_overhead(tmp: Path) -> tuple[str, str]:
    rows = []
    raw_us: list[float] = []
    over_us: list[float] = []
    casc_us: list[float] = []
    for task, hidden in (("digits", None), ("vibration", None), ("digits", (512, 512))):
        pkg = _build(tmp, task, hidden)
        res = bench_package(pkg, runs=RUNS, threads=1)
        for r in res.values():
            layers = "default" if hidden is None else "×".join(map(str, hidden))
            pred, raw = float(r["predictor_ms_p50"]) * 1e3, float(r["raw_ms_p50"]) * 1e3
            casc = float(r["cascade_ms_p50"]) * 1e3
            raw_us.append(raw)
            over_us.append(pred - raw)
            casc_us.append(casc - pred)
            rows.append([task, layers, r["variant"], f"{pred:.1f}", f"{raw:.1f}",
                         f"{float(r['ratio']):.2f}", f"{pred - raw:.1f}", f"{casc:.1f}",
                         f"{casc - pred:.1f}"])
    table = md_table(["task", "hidden", "variant", "Predictor p50 µs", "bare runtime p50 µs",
                      "ratio", "overhead µs", "cascade p50 µs", "cascade adds µs"], rows)
    summary = (f"the bare model runs in {min(raw_us):.1f}–{max(raw_us):.1f} µs and the "
               f"Predictor adds {min(over_us):.1f}–{max(over_us):.1f} µs (the cascade "
               f"{min(casc_us):.1f}–{max(casc_us):.1f} µs more)")
    return table, summary


def _through_pty(wire: list[bytes], expect: int, timeout: float = 120.0
                 ) -> tuple[list[Frame], float, Metrics]:
    """Write ``wire`` into a pty master; the reader reads the slave. (frames, seconds)."""
    master, slave = os.openpty()
    metrics = Metrics()
    got: queue.Queue[Frame] = queue.Queue()
    reader = SerialReader(os.ttyname(slave), got.put, metrics=metrics).start()
    reader.connected.wait(10)
    data = b"".join(wire)

    def write() -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(master, view[:65536]):]

    t0 = time.perf_counter()
    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    while got.qsize() < expect and time.monotonic() < deadline:
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    writer.join(timeout)
    time.sleep(0.3)  # anything late still counts
    reader.stop()
    os.close(master)
    os.close(slave)
    return [got.get() for _ in range(got.qsize())], elapsed, metrics


def serial_throughput() -> str:
    rows = []
    for name, ptype, size, n in (("digits pixels", PayloadType.U8_VECTOR, 64, 20000),
                                 ("vibration window", PayloadType.ACCEL_F32, 12288, 1000)):
        payload = bytes(random.Random(1).randrange(256) for _ in range(size))
        wire = [encode_frame(1, i, i, ptype, payload) for i in range(n)]
        frames, secs, _ = _through_pty(wire, n)
        mb = sum(map(len, wire)) / secs / 1e6
        rows.append([name, size, len(frames), n, f"{len(frames) / secs:,.0f}", f"{mb:.1f}"])
    return md_table(["frames", "payload bytes", "delivered", "sent", "frames/s", "MB/s"], rows)


def corrupted_stream() -> str:
    rows = []
    for rate in (0.01,):
        rng = random.Random(7)
        n = 5000
        wire = [encode_frame(2, i, i, PayloadType.U8_VECTOR,
                             bytes(rng.randrange(256) for _ in range(64))) for i in range(n)]
        data, hits = corrupt_bytes(b"".join(wire), rate, rng)
        touched, start, h = set(), 0, 0
        for k, w in enumerate(wire):
            end = start + len(w)
            while h < len(hits) and hits[h] < end:
                touched.add(k)
                h += 1
            start = end
        good = set(range(n)) - touched
        frames, _secs, m = _through_pty([data], len(good), timeout=30)
        seqs = {f.seq for f in frames}
        c = m.snapshot()["counters"]
        rows.append([f"{rate:.0%}", n, len(hits), len(touched), len(good),
                     len(good & seqs), len(seqs - good), c.get("serial_crc_errors", 0),
                     c.get("serial_malformed", 0), c.get("serial_resyncs", 0),
                     c.get("serial_seq_gaps", 0)])
    return md_table(["corrupted bytes", "frames", "bytes hit", "frames touched",
                     "frames untouched", "untouched delivered", "touched delivered",
                     "CRC errors", "malformed", "resyncs", "seq gaps"], rows)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        overhead, summary = predictor_overhead(Path(tmp))
    body = f"""
### Predictor overhead (batch 1, 1 runtime thread, median of {RUNS} calls each, alternating)

The bare runtime call is the backend's `run_raw`: onnxruntime's session run (the binding
`InferenceSession.run` wraps, with one reused `RunOptions`) or LiteRT `set_tensor +
invoke + get_tensor`, on an input already normalized and quantized. The Predictor adds
input validation (shape, dtype, NaN/inf, range), normalization (fused into the int8
quantization for LiteRT), the temperature softmax (a 256-entry table lookup for an int8
output), the Prediction object and metrics. The cascade column is the same sample through
`HybridPredictor` answering locally (τ = 0, no scorer): the input is validated once there
too. `edgefleet models bench PACKAGE` measures the same.

{overhead}

The target ratio (≤ 1.15) is out of reach for these MLPs at batch 1: {summary}. What
remains is a dozen NumPy calls on tiny arrays at 0.3–0.5 µs each in CPython (validation:
two compares and two counts; normalization: two for ONNX, or the fused int8 quantization:
six for LiteRT; softmax: four; one arg-max), one lock for the metrics and the Prediction
object, independent of the model, so the ratio falls as the model grows (the 512×512
rows) and the absolute overhead is the number to read. The bare LiteRT call includes the
backend's lock (the interpreter is not thread-safe), about 0.2 µs.

### Serial reader throughput through a pty

One process writes frames into a pty master as fast as it can; the `SerialReader` reads
the slave through pyserial, decodes and delivers them to a queue.

{serial_throughput()}

### Under 1 % corrupted bytes

5000 digits frames; each byte is replaced by a different random value with probability
1 %. A frame is *touched* when a corrupted byte lands anywhere in it (delimiters
included). Every untouched frame must be delivered, and no touched frame may be (CRC-32).

{corrupted_stream()}

Command: `.venv/bin/python scripts/bench_runtime.py`
"""
    path = write_section("runtime", "Runtime: Predictor overhead and serial input", body)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
