"""The :class:`~edgefleet.device.core.metrics.Metrics` registry in Prometheus' terms.

One translation for both sides, so nothing is counted twice: the server's services hand
:func:`families` to prometheus-client (``edgefleet.server.metrics.exporter``), the agent
renders them itself with :func:`render` into a node-exporter textfile (a Pi installs no
metrics library and opens no listening port for it).

Conventions of the translation:

- every name gets the ``edgefleet_`` prefix; counters end in ``_total``;
- a name may carry labels in Prometheus' own syntax, ``name{kind="metadata"}``
  (see :func:`labelled`): same base name, one family;
- histograms named ``..._ms`` (the device's latency histograms) are exported in seconds
  (``..._seconds``, bounds and sum divided by 1000), as Prometheus expects;
- a string gauge (``agent_state = "serving"``) becomes ``name{value="serving"} 1``;
  a gauge that is None is left out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.device.core.durable import atomic_write_bytes
from edgefleet.device.core.metrics import Metrics

__all__ = ["PREFIX", "Family", "families", "labelled", "render", "write_textfile"]

PREFIX = "edgefleet_"
_LABELLED = re.compile(r"^([^{]+)\{(.*)\}$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_BAD_NAME = re.compile(r"[^a-zA-Z0-9_:]")


@dataclass
class Family:
    """One metric family: ``kind`` is counter, gauge or histogram; ``samples`` are
    ``(name suffix, labels, value)`` with the suffix ``""``, ``_total``, ``_bucket``,
    ``_sum`` or ``_count``."""

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def labelled(name: str, **labels: str) -> str:
    """``name{k="v",...}``: a Metrics name that :func:`families` exports with labels."""
    if not labels:
        return name
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _split(name: str) -> tuple[str, dict[str, str]]:
    m = _LABELLED.match(name)
    if m is None:
        return _BAD_NAME.sub("_", name), {}
    labels = {k: re.sub(r"\\(.)", lambda g: "\n" if g.group(1) == "n" else g.group(1), v)
              for k, v in _PAIR.findall(m.group(2))}
    return _BAD_NAME.sub("_", m.group(1)), labels


def families(snapshot: Mapping[str, Any], prefix: str = PREFIX) -> list[Family]:
    """The families of a :meth:`Metrics.snapshot`, sorted by name."""
    out: dict[str, Family] = {}

    def family(name: str, kind: str, what: str) -> Family:
        fam = out.get(name)
        if fam is None or fam.kind != kind:  # a clash of kinds: keep the first
            fam = out.setdefault(name, Family(name, kind, what))
        return fam

    for raw, value in snapshot.get("counters", {}).items():
        base, labels = _split(raw)
        fam = family(prefix + base, "counter", f"edgefleet counter {base}")
        if fam.kind == "counter":
            fam.samples.append(("_total", labels, float(value)))
    for raw, value in snapshot.get("gauges", {}).items():
        base, labels = _split(raw)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        fam = family(prefix + base, "gauge", f"edgefleet gauge {base}")
        if fam.kind != "gauge":
            continue
        if isinstance(value, str):
            fam.samples.append(("", {**labels, "value": value[:64]}, 1.0))
        else:
            fam.samples.append(("", labels, float(value)))
    for raw, h in snapshot.get("histograms", {}).items():
        base, labels = _split(raw)
        scale = 1.0
        if base.endswith("_ms"):
            base, scale = base[:-3] + "_seconds", 1e-3
        fam = family(prefix + base, "histogram", f"edgefleet histogram {base}")
        if fam.kind != "histogram":
            continue
        seen = 0
        for bound, count in zip(h["bounds"], h["counts"], strict=False):
            seen += count
            fam.samples.append(("_bucket", {**labels, "le": _float(bound * scale)},
                                float(seen)))
        fam.samples.append(("_bucket", {**labels, "le": "+Inf"}, float(h["count"])))
        fam.samples.append(("_sum", labels, float(h["sum"]) * scale))
        fam.samples.append(("_count", labels, float(h["count"])))
    return [out[k] for k in sorted(out)]


def _float(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ("+Inf" if v > 0 else "-Inf")


def render(fams: Iterable[Family]) -> str:
    """The text exposition format (version 0.0.4) of ``fams``."""
    lines: list[str] = []
    for fam in fams:
        # Version 0.0.4 names a counter's family by its sample, ``..._total``.
        head = fam.name + "_total" if fam.kind == "counter" else fam.name
        lines.append(f"# HELP {head} {fam.help}")
        lines.append(f"# TYPE {head} {fam.kind}")
        for suffix, labels, value in fam.samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{fam.name}{suffix}{{{lab}}} {_float(value)}" if lab
                         else f"{fam.name}{suffix} {_float(value)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, metrics: Metrics) -> None:
    """Write ``metrics`` for node-exporter's textfile collector, atomically (a scrape
    never sees half a file); world-readable, since node-exporter runs as its own user."""
    atomic_write_bytes(path, render(families(metrics.snapshot())).encode(), mode=0o644)
