"""One device's registry row as operators see it: what ``edgefleet fleet ls`` prints and
the dashboard shows (rates from the store's counters, the larger of the two drift PSIs)."""

from __future__ import annotations

import datetime as dt
from typing import Any

__all__ = ["SORTS", "STATUSES", "device_row", "fmt_time", "fmt_value", "select_rows"]

#: ``fleet ls --status``: reporting now, or heard of and not reporting now.
STATUSES = ("online", "offline")
#: ``fleet ls --sort``: by device id (A to Z), or most recently heard of first.
SORTS = ("device", "last_seen")


def fmt_value(v: Any, pct: bool = False) -> str:
    """A value as a cell shows it: ``-`` for None, a rate as ``12.3%``, a float to three
    places (the CLI prints it, the dashboard escapes it)."""
    if v is None:
        return "-"
    if pct:
        return f"{v:.1%}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def fmt_time(ts: float | None) -> str:
    """A time stamp as a cell shows it (local time, to the second), ``-`` for None."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _rate(n: int, total: int) -> float | None:
    return round(n / total, 4) if total else None


def device_row(d: dict[str, Any]) -> dict[str, Any]:
    """A store row (:meth:`Store.devices`) as the operator's row."""
    drift = [v for v in (d["drift_input"], d["drift_confidence"]) if v is not None]
    return {"device": d["device"], "online": bool(d["online"]), "last_seen": d["last_seen"],
            "model_version": d["model_version"], "model_name": d["model_name"],
            "inferences": d["n_inferences"],
            "fallback_rate": _rate(d["n_fallback"], d["n_inferences"]),
            "degraded_rate": _rate(d["n_degraded"], d["n_inferences"]),
            "drift": max(drift) if drift else None, "epsilon": d["epsilon"],
            "messages": d["messages"], "spool_dropped": d["spool_dropped"]}


def select_rows(rows: list[dict[str, Any]], *, status: str | None = None,
                model: str | None = None, sort: str = "device") -> list[dict[str, Any]]:
    """Operator rows (:func:`device_row`) that match the filters, in ``sort`` order.

    ``model`` is ``NAME``, ``NAME@VERSION`` or a bare ``VERSION`` (a device whose model
    has no name yet); ``sort`` is one of :data:`SORTS`, ``status`` one of :data:`STATUSES`.
    Unknown values raise ValueError (the CLI checks them first).
    """
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r}: expected one of {', '.join(STATUSES)}")
    if sort not in SORTS:
        raise ValueError(f"sort {sort!r}: expected one of {', '.join(SORTS)}")
    out = rows
    if status is not None:
        out = [r for r in out if r["online"] is (status == "online")]
    if model is not None:
        name, at, version = model.partition("@")
        out = [r for r in out if (r["model_name"] == name and (not at
                                                                or r["model_version"] == version))
               or (not at and r["model_name"] is None and r["model_version"] == name)]
    if sort == "last_seen":  # newest first; never heard of last; ties by device id
        return sorted(out, key=lambda r: (r["last_seen"] is None, -(r["last_seen"] or 0.0),
                                          r["device"]))
    return sorted(out, key=lambda r: r["device"])
