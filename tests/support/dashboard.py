"""A small fleet in a store for the dashboard tests: devices written the way the ingest
writes them (its own registry-field mapping), an alert, a retraining request."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgefleet.device.wire.telemetry import MetricsBody
from edgefleet.server.retrain.policy import Approvals
from edgefleet.server.telemetry.ingest import _registry_fields
from edgefleet.server.telemetry.store import Store

HOSTILE = "<script>window.pwned=1</script>"

__all__ = ["HOSTILE", "metrics_body", "report", "seed_fleet"]


def metrics_body(inferences: int, *, fallback: int = 0, degraded: int = 0, version: str = "1.0.0",
                 psi: float = 0.05, epsilon: float | None = 1.5) -> dict[str, Any]:
    """A telemetry ``metrics`` body as an agent sends it."""
    return {"inferences": inferences, "local": inferences - fallback, "fallback": fallback,
            "degraded": degraded,
            "latency_ms": {"count": inferences, "p50": 2.0, "p95": 4.5, "p99": 6.0},
            "drift": {"input_psi": psi, "confidence_psi": psi / 2, "window": 500},
            "model": {"name": "digits-mlp", "version": version},
            "training": {"state": "ready", "epsilon": epsilon}}


def report(store: Store, device: str, seq: int, body: dict[str, Any],
           ts: float | None = None) -> None:
    """Store one metrics report as the ingest would (message, registry row, last seen)."""
    ts = time.time() if ts is None else ts
    with store.transaction():
        store.touch_device(device, ts, 1, 0)
        store.insert_message(device, "boot-1", seq, "metrics", ts, ts,
                             json.dumps({"v": 1, "body": body}))
        store.update_metrics(device, ts, _registry_fields(MetricsBody.model_validate(body)),
                             body)


def seed_fleet(store: Store, registry: Path) -> str:
    """Three devices (one with a hostile name), a drift alert with hostile text, a pending
    retraining request; returns the request id."""
    now = time.time()
    for i, dev in enumerate(("pi-01", "pi-02", HOSTILE)):
        store.set_status(dev, i != 1, now, "boot-1")
        for seq in range(3):
            report(store, dev, seq, metrics_body(100 * (seq + 1), fallback=5 * seq,
                                                 psi=0.1 * (i + 1)), now - 30 + seq)
    store.open_alert("pi-01", "drift", now - 10)
    store.add_event(now - 10, "pi-01", "alert.drift", "warning",
                    f"drift: input psi 0.400 > 0.25 {HOSTILE}", {})
    store.open_alert(HOSTILE, "silent", now - 5)
    registry.mkdir(parents=True, exist_ok=True)
    approvals = Approvals(registry / "retrain.db")
    try:
        return approvals.request("lab", now, {"alerting": ["pi-01"], "devices": 2})
    finally:
        approvals.db.close()
