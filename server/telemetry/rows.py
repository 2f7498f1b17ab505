"""One device's registry row as operators see it: what ``edgefleet fleet ls`` prints and
the dashboard shows (rates from the store's counters, the larger of the two drift PSIs)."""

from __future__ import annotations

from typing import Any

__all__ = ["device_row"]


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
