"""Deterministic fault injection for the serial frame stream (simulator, tests, benchmark).

Each fault is drawn per frame from a seeded generator, and the injector says which frames
it touched, so a test can demand that every untouched frame arrives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

from edgefleet.device.core.errors import UsageError

__all__ = ["Chunk", "FaultInjector", "Faults", "corrupt_bytes"]

#: A piece of wire bytes, or a pause in seconds.
Chunk = bytes | float


@dataclass(frozen=True)
class Faults:
    """Per-frame probabilities of each fault (0 = never)."""

    bitflip: float = 0.0  #: flip one random bit of the frame
    truncate: float = 0.0  #: send only a prefix of the frame
    garbage: float = 0.0  #: random bytes (zeros included) before the frame
    pause: float = 0.0  #: stop mid-frame for ``pause_s``
    pause_s: float = 0.2

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"bitflip=0.01,truncate=0.005,pause=0.01,pause_s=0.3"`` → :class:`Faults`."""
        known = {f.name for f in fields(cls)}
        values: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, val = item.partition("=")
            if not sep or key not in known:
                raise UsageError(f"bad fault {item!r} (use name=probability, names: "
                                 f"{', '.join(sorted(known))})")
            try:
                values[key] = float(val)
            except ValueError:
                raise UsageError(f"fault {key}: {val!r} is not a number") from None
            if values[key] < 0 or (key != "pause_s" and values[key] > 1):
                raise UsageError(f"fault {key}: {val} is out of range")
        return cls(**values)


class FaultInjector:
    """Applies :class:`Faults` to wire frames, deterministically in ``seed``."""

    def __init__(self, faults: Faults, seed: int = 0) -> None:
        self.faults = faults
        self.rng = random.Random(seed)

    def apply(self, wire: bytes) -> tuple[list[Chunk], bool]:
        """The chunks to send for one frame, and whether the frame itself was damaged."""
        f, rng = self.faults, self.rng
        out: list[Chunk] = []
        touched = False
        if f.garbage and rng.random() < f.garbage:
            out.append(rng.randbytes(rng.randint(1, 64)))
        data = bytearray(wire)
        if f.bitflip and rng.random() < f.bitflip:
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
            touched = True
        if f.truncate and rng.random() < f.truncate:
            del data[rng.randrange(1, len(data) - 1):]
            touched = True
        if f.pause and rng.random() < f.pause and len(data) > 2:
            cut = rng.randrange(1, len(data) - 1)
            out += [bytes(data[:cut]), f.pause_s, bytes(data[cut:])]
        else:
            out.append(bytes(data))
        return out, touched


def corrupt_bytes(data: bytes, rate: float, rng: random.Random) -> tuple[bytes, list[int]]:
    """Replace each byte with a different random value with probability ``rate``."""
    buf = bytearray(data)
    n = len(buf)
    hits = sorted(rng.sample(range(n), round(n * rate))) if n else []
    for i in hits:
        buf[i] ^= rng.randrange(1, 256)
    return bytes(buf), hits
