"""The guarded JSON reader against plain ``json.loads`` on the payloads it guards.

Every MQTT consumer and the local API parse untrusted bytes with
``edgefleet.device.core.guarded_json.loads_guarded`` (size, depth, keys, lists, finite
numbers). This measures what those checks cost, side by side in one run. Writes
docs/bench/guarded-json.md.

    .venv/bin/python scripts/bench_guarded_json.py
"""

from __future__ import annotations

import json
import sys
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import md_table, write_section

from edgefleet.device.core.guarded_json import JsonLimits, loads_guarded


def payloads() -> dict[str, tuple[bytes, JsonLimits]]:
    """Typical messages of each consumer, with the limits the consumer uses."""
    metrics: dict[str, Any] = {
        "v": 1, "device": "dev-01", "boot": "0123456789abcdef", "seq": 123,
        "ts": 1796418520.25, "kind": "metrics",
        "body": {"counters": {f"c{i}": i * 7 for i in range(60)},
                 "gauges": {f"g{i}": i * 0.5 for i in range(20)},
                 "latency_ms": {"p50": 0.19, "p99": 0.83, "buckets": list(range(12))},
                 "drift": {"psi": 0.01, "conf_psi": 0.02}}}
    big = {**metrics, "body": {"counters": {f"c{i}": i for i in range(1500)}}}
    score = {"v": 1, "task": "digits", "model": "digits-mlp@1.0.0", "mode": "raw",
             "input": [float(i % 17) for i in range(64)]}
    return {
        "telemetry metrics, 1.2 KB": (json.dumps(metrics).encode(),
                                      JsonLimits(max_bytes=1 << 20)),
        "telemetry, 1,500 counters (walked)": (json.dumps(big).encode(),
                                               JsonLimits(max_bytes=1 << 20)),
        "scoring request, 64 floats": (json.dumps(score).encode(),
                                       JsonLimits(max_bytes=256 * 1024, max_depth=3)),
    }


def per_call_us(fn: Any, raw: bytes, *args: Any) -> float:
    """Best of 5 repeats of 2,000 calls, in microseconds per call."""
    runs = timeit.repeat(lambda: fn(raw, *args), number=2000, repeat=5)
    return min(runs) / 2000 * 1e6


def main() -> None:
    rows = []
    for name, (raw, limits) in payloads().items():
        plain = per_call_us(json.loads, raw)
        guarded = per_call_us(loads_guarded, raw, limits)
        rows.append([name, len(raw), f"{plain:.1f}", f"{guarded:.1f}", f"{guarded / plain:.2f}"])
        print(rows[-1], flush=True)
    body = ("`json.loads` and `loads_guarded` on the same bytes, best of 5 × 2,000 calls. "
            "The reader skips its depth scan and its walk over the parsed document when the "
            "bytes alone show no limit can be hit (fewer brackets than the depth limit; too "
            "short to hold too many keys, items or characters; no digit run or 3-digit "
            "exponent that could make an integer too long or a float infinite); the second "
            "row is one that must be walked.\n\n"
            + md_table(["payload", "bytes", "json.loads µs", "loads_guarded µs", "ratio"], rows))
    path = write_section("guarded-json", "The guarded JSON reader's cost", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
